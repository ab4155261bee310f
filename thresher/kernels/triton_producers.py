"""The kernels that make a projection's thresholded input from what the previous projection wrote, in Triton.

In a Llama layer every projection input but o's is made by a small kernel from the previous projection's output:
the residual add and RMSNorm before q/k/v and gate/up, SiLU-and-multiply before down. The sparse GEMV's compaction
(`triton_sparse._compact_live_channels`) computes that input itself, chunk by chunk, from the previous projection's
fp32 output (each program reads the whole row for the norm; at decode that is a few KB from L2), so the input
never makes a round trip through memory and its kernel's launch is saved. `produce_thresholded` is the same
computation over whole rows, for the dense path (prefill, larger batches), where cuBLAS then reads x.

Rounding follows vLLM's native ops on the model dtype, as if the previous projection's output had been cast first:
    silu_mul:      x = round(silu(g) * u),  g, u = round(gate_up[:, :K]), round(gate_up[:, K:])
    add_rms_norm:  h = round(y) + residual (fp32); residual_out = round(h);
                   x = round(round(h / rms(h)) * weight)
Then x is thresholded per row: kept where |x| > thresholds[level of the row].

Before vLLM's FP8 GEMM, `produce_fp8` also quantizes x to e4m3 per row, as vLLM's dynamic per-token quantization
(`QuantFP8`, which stock vLLM's Inductor fuses into the RMSNorm the same way):
    scale = max(max|x| / 448, 1 / (448 * 512));  x8 = e4m3(clamp(x * (1 / scale), -448, 448))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from thresher.kernels.reference import ADD_RMS_NORM

TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# e4m3's largest value, and vLLM's smallest per-token scale
FP8_MAX = tl.constexpr(448.0)
FP8_MIN_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))

# the norm's whole-row sum reads tiles of at most this many elements: at decode (K = 4096, two rows) the whole row
# in one load, so the sum waits on one round trip to L2 instead of one per tile
NORM_TILE = 8192


def norm_block(k: int, block_b: int) -> int:
    return min(triton.next_power_of_2(k), max(16, NORM_TILE // block_b))


@triton.jit
def _inverse_rms(source_ptr, residual_ptr, rows, row_ok, K, eps, DTYPE: tl.constexpr, BLOCK_B: tl.constexpr,
                 NORM_BLOCK: tl.constexpr):
    """1 / rms(round(y) + residual) per row, over the whole row."""
    squares = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for start in range(0, K, NORM_BLOCK):
        cols = start + tl.arange(0, NORM_BLOCK)
        mask = row_ok[:, None] & (cols < K)[None, :]
        y = tl.load(source_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
        r = tl.load(residual_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
        h = y.to(DTYPE).to(tl.float32) + r.to(tl.float32)
        squares += tl.sum(h * h, axis=1)
    return 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def produce_tile(source_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, inverse_rms, rows, ks, mask, K,
                 PRODUCER: tl.constexpr, DTYPE: tl.constexpr):
    """x at rows x ks (model dtype, not yet thresholded); under ADD_RMS_NORM also writes the residual out there.
    `inverse_rms` is `_inverse_rms` of the rows under ADD_RMS_NORM, unused otherwise."""
    offsets = rows[:, None] * K + ks[None, :]
    if PRODUCER == 1:  # SILU_MUL: source is [rows, 2K] fp32 (gate, then up)
        gate_up = rows[:, None] * (2 * K) + ks[None, :]
        g = tl.load(source_ptr + gate_up, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
        u = tl.load(source_ptr + gate_up + K, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
        return (g / (1.0 + tl.exp(-g)) * u).to(DTYPE)
    elif PRODUCER == 2:  # ADD_RMS_NORM: source is the previous projection's [rows, K] fp32 output
        y = tl.load(source_ptr + offsets, mask=mask, other=0.0)
        r = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        h = y.to(DTYPE).to(tl.float32) + r.to(tl.float32)
        tl.store(residual_out_ptr + offsets, h.to(DTYPE), mask=mask)
        weight = tl.load(norm_weight_ptr + ks, mask=ks < K, other=0.0)
        normed = (h * inverse_rms[:, None]).to(DTYPE).to(tl.float32)
        return (normed * weight.to(tl.float32)[None, :]).to(DTYPE)
    else:  # PLAIN: source is x
        return tl.load(source_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def row_inverse_rms(source_ptr, residual_ptr, rows, row_ok, K, eps, PRODUCER: tl.constexpr, DTYPE: tl.constexpr,
                    BLOCK_B: tl.constexpr, NORM_BLOCK: tl.constexpr):
    if PRODUCER == 2:
        return _inverse_rms(source_ptr, residual_ptr, rows, row_ok, K, eps, DTYPE, BLOCK_B, NORM_BLOCK)
    return tl.zeros((BLOCK_B,), dtype=tl.float32)


# Few rows (decode batches above the Triton kernel's crossover) spread each row over several programs, up to about
# one program per SM of an H100 (132): one program per row would leave most SMs idle while 16 programs walk 14,336
# channels each in turn. Many rows (prefill) give each program a whole row, whose norm is then summed once.
SPREAD_PROGRAMS = 128
ROW_TILE = 1024


@triton.jit
def _produce_rows(
    source_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, thresholds_ptr, levels_ptr, x_ptr, K, eps, SPAN,
    PRODUCER: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, NORM_BLOCK: tl.constexpr,
):
    """One program per (row, SPAN columns): x = threshold(produce(row)) there; under ADD_RMS_NORM each program sums
    the whole row for the norm."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    row_ok = rows >= 0
    inverse_rms = row_inverse_rms(source_ptr, residual_ptr, rows, row_ok, K, eps, PRODUCER, DTYPE, 1, NORM_BLOCK)
    level = tl.load(levels_ptr + rows)
    first = tl.program_id(1) * SPAN
    for start in range(first, first + SPAN, BLOCK):
        ks = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (ks < K)[None, :]
        x = produce_tile(source_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, inverse_rms, rows, ks, mask,
                         K, PRODUCER, DTYPE)
        t = tl.load(thresholds_ptr + level[:, None] * K + ks[None, :], mask=mask, other=0.0)
        x = tl.where(tl.abs(x.to(tl.float32)) > t, x, 0.0)
        tl.store(x_ptr + rows[:, None] * K + ks[None, :], x, mask=mask)


def produce_thresholded(
    producer: int, source: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor, dtype: torch.dtype,
    residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, residual_out): the thresholded input `[rows, K]` in `dtype`, and under ADD_RMS_NORM the new residual."""
    rows, k = source.shape[0], thresholds.shape[-1]
    x = torch.empty((rows, k), dtype=dtype, device=source.device)
    residual_out = torch.empty_like(residual) if producer == ADD_RMS_NORM else None
    if rows:
        block = min(ROW_TILE, triton.next_power_of_2(k))
        splits = max(1, min(triton.cdiv(k, block), SPREAD_PROGRAMS // rows))
        span = triton.cdiv(triton.cdiv(k, splits), block) * block
        # rows on the grid's first axis, the only one that takes more than 65,535 programs (long prefills)
        _produce_rows[(rows, triton.cdiv(k, span))](
            source, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
            residual_out if residual_out is not None else x, thresholds, levels, x, k, eps, span,
            PRODUCER=producer, DTYPE=TRITON_DTYPES[dtype], BLOCK=block, NORM_BLOCK=norm_block(k, 1),
            num_warps=8 if producer == ADD_RMS_NORM else 4,
        )
    return x, residual_out


@triton.jit
def _produce_rows_fp8(
    source_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, thresholds_ptr, levels_ptr, x_ptr, scale_ptr, K, eps,
    PRODUCER: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row, the whole row in one tile (the scale needs the row's largest magnitude before any of it
    is stored): x = threshold(produce(row)), then its e4m3 values and scale."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    row_ok = rows >= 0
    ks = tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (ks < K)[None, :]
    inverse_rms = row_inverse_rms(source_ptr, residual_ptr, rows, row_ok, K, eps, PRODUCER, DTYPE, 1, BLOCK)
    x = produce_tile(source_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, inverse_rms, rows, ks, mask, K,
                     PRODUCER, DTYPE).to(tl.float32)
    level = tl.load(levels_ptr + rows)
    t = tl.load(thresholds_ptr + level[:, None] * K + ks[None, :], mask=mask, other=0.0)
    x = tl.where(tl.abs(x) > t, x, 0.0)
    # IEEE divisions, as torch's (Triton's `/` on fp32 may round otherwise)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), FP8_MAX), FP8_MIN_SCALE)
    quantized = tl.clamp(x * tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None], -FP8_MAX, FP8_MAX)
    tl.store(x_ptr + rows[:, None] * K + ks[None, :], quantized.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + rows, scale)


def produce_fp8(
    producer: int, source: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor, dtype: torch.dtype,
    residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x8, scales, residual_out): the thresholded input `[rows, K]` made in `dtype` and quantized to e4m3 per row,
    its fp32 scales `[rows, 1]`, and under ADD_RMS_NORM the new residual."""
    rows, k = source.shape[0], thresholds.shape[-1]
    x8 = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=source.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=source.device)
    residual_out = torch.empty_like(residual) if producer == ADD_RMS_NORM else None
    if rows:
        block = triton.next_power_of_2(k)
        _produce_rows_fp8[(rows,)](
            source, residual if residual is not None else x8, norm_weight if norm_weight is not None else x8,
            residual_out if residual_out is not None else x8, thresholds, levels, x8, scales, k, eps,
            PRODUCER=producer, DTYPE=TRITON_DTYPES[dtype], BLOCK=block, num_warps=min(32, max(4, block // 512)),
        )
    return x8, scales, residual_out
