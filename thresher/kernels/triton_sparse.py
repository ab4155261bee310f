"""Thresholded sparse GEMV for decode (batch 1-16), in Triton.

    y[b, :] = sum_k  x[b, k] * [|x[b, k]| > t[level[b], k]] * Wt[k, :]

Weights are stored transposed, `Wt [in_features, out_features]` contiguous, so the weights one input channel
multiplies are one contiguous row: a channel that no row of the batch keeps is a row never read. The transposed copy
replaces the original (dense matmuls use the `Wt.t()` view at full cuBLAS speed), so it costs no extra memory.
Projections that share an input (q/k/v, gate/up) are one call on their concatenated weights.

The grid splits the output columns and the input channels; each program writes fp32 partial sums, and a second small
kernel adds the splits and casts, so there are no atomics (bf16 and fp16 alike, deterministic results).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BATCH = 16


@triton.jit
def _sparse_gemv_partials(
    x_ptr, wt_ptr, thresholds_ptr, levels_ptr, partials_ptr,
    B, K, N, k_per_split,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < N
    levels = tl.load(levels_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    # batch 1 accumulates elementwise and reduces over channels once at the end, not once per tile
    acc_1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        both = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=both, other=0.0)
        t = tl.load(thresholds_ptr + levels[:, None] * K + ks[None, :], mask=both, other=0.0)
        keep = tl.abs(x.to(tl.float32)) > t
        x = tl.where(keep, x, 0.0)
        # a weight row is read only if some row of the batch keeps that channel: masked lanes issue no loads
        channel_live = tl.max(keep.to(tl.int32), axis=0) > 0
        w = tl.load(wt_ptr + ks[:, None] * N + cols[None, :], mask=channel_live[:, None] & col_ok[None, :], other=0.0)
        if BLOCK_B == 1:
            acc_1 += x.to(tl.float32).reshape(BLOCK_K, 1) * w.to(tl.float32)
        else:
            # bf16/fp16 values are exact in tf32, so a tf32 dot loses nothing (and runs in the CPU interpreter too)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="tf32")
    if BLOCK_B == 1:
        acc += tl.sum(acc_1, axis=0)[None, :]
    out = partials_ptr + pid_k * B * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_splits(partials_ptr, y_ptr, total, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(partials_ptr + s * total + offsets, mask=ok, other=0.0)
    tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _launch_config(rows: int, k: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_K, BLOCK_N, splits, num_warps), from the sweep in bench/kernels.py on an H100 (Llama-3-8B
    shapes): ~1000 programs at batch 1 and ~260 above it, splitting the input channels when output columns are few."""
    if rows == 1:
        block_b, block_k, block_n, programs = 1, 128, 64, 1024
    else:
        block_b, block_k, block_n, programs = 16, 32, 256, 256
    n_blocks = triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(programs, n_blocks), triton.cdiv(k, 2 * block_k)))
    return block_b, block_k, block_n, splits, 4


def sparse_gemv(
    x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor, config=None
) -> torch.Tensor:
    """y = threshold(x) @ Wt for x `[rows <= 16, K]`, Wt `[K, N]`, thresholds `[L, K]` fp32, levels `[rows]` int."""
    rows, k = x.shape
    n = wt.shape[1]
    if not (x.is_contiguous() and wt.is_contiguous() and thresholds.is_contiguous()):
        raise ValueError("sparse_gemv needs contiguous x, Wt and thresholds")
    if rows > MAX_BATCH:
        raise ValueError(f"sparse_gemv takes at most {MAX_BATCH} rows, got {rows}")
    if wt.shape[0] != k or thresholds.shape[-1] != k:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, Wt {tuple(wt.shape)}, thresholds {tuple(thresholds.shape)}")
    block_b, block_k, block_n, splits, num_warps = config or _launch_config(rows, k, n)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    partials = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), splits)
    _sparse_gemv_partials[grid](
        x, wt, thresholds, levels, partials,
        rows, k, n, k_per_split, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    total = rows * n
    _sum_splits[(triton.cdiv(total, 1024),)](partials, y, total, SPLITS=splits, BLOCK=1024)
    return y
