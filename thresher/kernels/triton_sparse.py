"""Thresholded sparse GEMV for decode (batch 1-16), in Triton.

    y[b, :] = sum_k  x[b, k] * [|x[b, k]| > t[level[b], k]] * Wt[k, :]

Weights are stored transposed, `Wt [in_features, out_features]` contiguous, so the weights one input channel
multiplies are one contiguous row: a channel that no row of the batch keeps is a row never read. The transposed copy
replaces the original (dense matmuls use the `Wt.t()` view at full cuBLAS speed), so it costs no extra memory.
Projections that share an input (q/k/v, gate/up) are one call on their concatenated weights.

Two launches, and the output in fp32, which the engine's next op reads as it is (the next projection's compaction,
or, in the unfused layer, the RMSNorm or SiLU-and-multiply kernel that Inductor fuses the cast into):
1. `_compact_live_channels`: per chunk of input channels, the list of channels some row keeps, and their
   thresholded activations, packed to the front of the chunk; the other programs zero the fp32 output. The chunk's
   activations are either x itself or made on the spot from the previous projection's fp32 output (residual add
   and RMSNorm, or SiLU-and-multiply: `triton_producers`), so the kernel that would have made x is not launched.
2. `_gather_gemv`: per (output block, chunk), loop over that chunk's live channels only and gather their weight
   rows, multiplied on the tensor cores with the batch padded to 16 rows; each program adds its fp32 partial sum
   into the output with atomics. Work and bytes scale with the kept fraction, not with in_features. (At batch 1 the
   padded tensor-core product beat fp32 multiply-adds by ~3% at 0% and 50% sparsity on an H100: fewer registers,
   no conversions.)
FP8 weight rows meet the activations in fp16, not bf16: Hopper widens a pair of e4m3 values to fp16 in one
instruction, while bf16 takes a longer sequence, and at 0% sparsity the bf16 version gathered FP8 rows at 1.7 TB/s
where vLLM's FP8 GEMM streams them at 2.1 (one Llama-3-8B layer at batch 1 on an H100: 133.6 -> 126.4 us at 0%, 79.8
-> 78.1 at 50%; at batch 2 147.4 -> 132.7 and 119.1 -> 109.1). The compaction stores each row's kept values of its
chunk times a power of two that takes their largest magnitude to [2^14, 2^15), so fp16 holds every bf16 activation
of the chunk down to 2^-28 of that largest exactly (bf16's range is fp32's, far beyond fp16's 65,504), and the
gather multiplies its partial sums by the inverse powers with the weights' scales.
Atomics in fp32 work for bf16 and fp16 alike (TEAL's half-precision atomics limit it to fp16), but the order in
which the chunks' partial sums arrive changes from run to run, so results may differ in the last bits of fp32 (and,
rarely, in the last bit after the cast). The deterministic alternative, a third launch that adds the chunks' partial
sums in order, cost ~1 us per projection: one Llama-3-8B layer at batch 1, 50% sparsity on an H100 ran 1.63x dense
with it and 1.70x without.

On Hopper and newer, every launch uses programmatic dependent launch (PDL): a kernel's programs are scheduled while
the previous kernel still runs and wait (`gdc_wait`) before touching memory, which hides the launch gap between the
kernels and before the first. Together with the prefetched channel list in the gather loop, it cut the batch-1
time of one Llama-3-8B layer at 50% sparsity on an H100 by 3-6% (1.47x dense before, 1.52-1.57x after).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from thresher.kernels.reference import ADD_RMS_NORM, PLAIN, SILU_MUL
from thresher.kernels.triton_producers import TRITON_DTYPES, norm_block, produce_tile, row_inverse_rms

MAX_BATCH = 16
ZERO_BLOCK = 1024


@triton.jit
def wait_for_previous_kernel(USE_GDC: tl.constexpr):
    """Under PDL: wait until the previous kernel has finished and its writes are visible, then let the next kernel's
    programs be scheduled (they wait the same way, so starting them early is safe)."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _scaled_to_fp16(v):
    """(v * f as fp16, 1 / f) for v `[rows, chunk]` fp32 and f per row the power of two that takes the row's largest
    magnitude into [2^14, 2^15) (fp16's largest is 65,504): every bf16 value of the row down to 2^-28 of that
    largest is then exact in fp16, and the products with e4m3 weights exact in fp32."""
    largest = tl.max(tl.abs(v), axis=1)
    shift = tl.minimum(141 - ((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF), 126)  # 14 - exponent
    factor = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    return (v * factor[:, None]).to(tl.float16), inverse


@triton.jit
def _compact_live_channels(
    x_ptr, thresholds_ptr, levels_ptr, live_ptr, values_ptr, value_scales_ptr, counts_ptr, y_ptr,
    residual_ptr, norm_weight_ptr, residual_out_ptr, eps,
    B, K, chunk, chunks, total,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, HAS_THRESHOLDS: tl.constexpr, USE_GDC: tl.constexpr,
    ZERO_BLOCK: tl.constexpr, PRODUCER: tl.constexpr, DTYPE: tl.constexpr, NORM_BLOCK: tl.constexpr,
    FP16_VALUES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    offsets = tl.arange(0, CHUNK)
    ks = pid * chunk + offsets
    row_ok = rows < B
    k_ok = (offsets < chunk) & (ks < K)  # false in the programs past the last chunk, which only zero the output
    both = row_ok[:, None] & k_ok[None, :]
    if HAS_THRESHOLDS:
        # levels and thresholds were written before the previous kernel started, so their dependent loads may run
        # before the wait, overlapping that kernel's tail
        levels = tl.load(levels_ptr + rows, mask=row_ok, other=0)
        t = tl.load(thresholds_ptr + levels[:, None] * K + ks[None, :], mask=both, other=0.0)
    wait_for_previous_kernel(USE_GDC)
    # the output the gather adds into starts at zero (after the wait: its memory may be the previous kernel's)
    zeros = pid * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
    tl.store(y_ptr + zeros, tl.zeros((ZERO_BLOCK,), dtype=tl.float32), mask=zeros < total)
    if pid < chunks:
        # x from what the previous kernel wrote (see triton_producers): as is, or SiLU-and-multiply, or the residual
        # add and RMSNorm, whose every program reads the whole row for the norm
        inverse_rms = row_inverse_rms(x_ptr, residual_ptr, rows, row_ok, K, eps, PRODUCER, DTYPE, BLOCK_B,
                                      NORM_BLOCK)
        x = produce_tile(x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, inverse_rms, rows, ks, both, K,
                         PRODUCER, DTYPE)
        if HAS_THRESHOLDS:
            keep = (tl.abs(x.to(tl.float32)) > t) & both
        else:
            keep = (x != 0) & both
        live = tl.max(keep.to(tl.int32), axis=0)
        slot = tl.cumsum(live, axis=0) - 1
        base = pid * chunk
        tl.store(live_ptr + base + slot, ks, mask=live > 0)
        kept = tl.where(keep, x, 0.0)
        if FP16_VALUES:  # FP8 weights (module docstring)
            kept, inverse = _scaled_to_fp16(kept.to(tl.float32))
            tl.store(value_scales_ptr + pid * B + rows, inverse, mask=row_ok)
        tl.store(values_ptr + rows[:, None] * K + base + slot[None, :], kept,
                 mask=row_ok[:, None] & (live > 0)[None, :])
        tl.store(counts_ptr + pid, tl.sum(live, axis=0))


@triton.jit
def _load_tiles(wt_ptr, values_ptr, ks, slots, count, rows, cols, row_ok, col_ok, base, K, N):
    """The values `[BLOCK_B, BLOCK_K]` at compacted positions `slots` and the weight rows `[BLOCK_K, BLOCK_N]` of
    their channels `ks`."""
    slot_ok = slots < count
    w = tl.load(wt_ptr + ks[:, None] * N + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
    x = tl.load(values_ptr + rows[:, None] * K + base + slots[None, :], mask=row_ok[:, None] & slot_ok[None, :],
                other=0.0)
    return x, w


@triton.jit
def _accumulate(acc, x, w, NATIVE_DOT: tl.constexpr):
    if NATIVE_DOT:
        # tensor cores on the half-precision tiles, fp32 accumulation: even a single row is cheaper padded to
        # BLOCK_B rows this way than as fp32 multiply-adds (fewer registers, no conversions). FP8 weight rows are
        # widened to the values' fp16 in registers, exactly (every e4m3 value is an fp16 value)
        return acc + tl.dot(x, w.to(x.dtype))
    # the CPU interpreter gets bf16 products wrong (numpy has no bfloat16), so it multiplies in fp32
    return acc + tl.dot(x.to(tl.float32), w.to(tl.float32))


@triton.jit
def _gather_gemv(
    wt_ptr, scale_ptr, live_ptr, values_ptr, value_scales_ptr, counts_ptr, y_ptr,
    B, K, N, chunk,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
    NATIVE_DOT: tl.constexpr, USE_GDC: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    col_ok = cols < N
    base = pid_k * chunk
    lanes = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    wait_for_previous_kernel(USE_GDC)
    count = tl.load(counts_ptr + pid_k)
    if STAGES == 1:
        ks = tl.load(live_ptr + base + lanes, mask=lanes < count, other=0)
        for i in range(0, count, BLOCK_K):
            slots = i + lanes
            x, w = _load_tiles(wt_ptr, values_ptr, ks, slots, count, rows, cols, row_ok, col_ok, base, K, N)
            # the next iteration's channel list loads while this one's weight rows do, so the weight gather does
            # not wait on a dependent index load
            ks = tl.load(live_ptr + base + slots + BLOCK_K, mask=slots + BLOCK_K < count, other=0)
            acc = _accumulate(acc, x, w, NATIVE_DOT)
    else:
        # Triton's software pipelining (asynchronous copies STAGES - 1 iterations ahead)
        for i in tl.range(0, count, BLOCK_K, num_stages=STAGES):
            slots = i + lanes
            ks = tl.load(live_ptr + base + slots, mask=slots < count, other=0)
            x, w = _load_tiles(wt_ptr, values_ptr, ks, slots, count, rows, cols, row_ok, col_ok, base, K, N)
            acc = _accumulate(acc, x, w, NATIVE_DOT)
    if HAS_SCALE:  # FP8 weights: one scale per output channel and the chunk's per row, once on its partial sums
        acc = (acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
               * tl.load(value_scales_ptr + pid_k * B + rows, mask=row_ok, other=0.0)[:, None])
    tl.atomic_add(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :],
                  sem="relaxed")


@functools.cache
def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA device of compute capability 9 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_config(k: int, n: int, fp8: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_K, BLOCK_N, chunks, num_warps, STAGES), from sweeps on an H100 (Llama-3-8B shapes, batch 1 and 2 at
    50% sparsity): the input channels split into 544 / (N / 128) chunks (about four 128-column programs per SM),
    rounded down. Narrow outputs (qkv, o) then gather 64-column blocks, twice the programs, through Triton's 2-stage
    pipelining: 0.7-0.9 us faster per call at batch 1. Wide ones (gate_up, down) keep 128-column blocks and the loop
    that prefetches its channel list; pipelined, they were 1-4% slower.

    FP8 rows are half the bytes, so every output gathers 128-column blocks (the bf16 tile's bytes at narrow
    widths), gate_up in twice the chunks, and only qkv and o pipelined: one layer at batch 1, 50%, 81.0 us instead
    of 88.7 with the bf16 configurations (bench/RESULTS.md, "FP8 launch configurations")."""
    block_k, block_n = 64, 128
    chunks = max(1, min(544 // triton.cdiv(n, block_n), triton.cdiv(k, 2 * block_k)))
    if fp8:
        if n > 8192:
            return block_k, block_n, max(1, min(1088 // triton.cdiv(n, block_n), triton.cdiv(k, 2 * block_k))), 4, 1
        return block_k, block_n, chunks, 4, 2 if k <= 8192 else 1
    if n <= 8192:
        return block_k, 64, chunks, 4, 2
    return block_k, block_n, chunks, 4, 1


def sparse_gemv(
    x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor | None = None, levels: torch.Tensor | None = None,
    config=None, *, producer: int = PLAIN, residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual_out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = threshold(x) @ Wt in fp32, for x `[rows <= 16, K]`, Wt `[K, N]`, thresholds `[L, K]` fp32, levels `[rows]`
    int.

    FP8 weights (`float8_e4m3fn` Wt with `weight_scale`, fp32 `[N]` or one value: y = threshold(x) @ (Wt * scale))
    make their activations in `dtype` (default: x's), gather the kept FP8 rows and widen them in registers (to fp16,
    with the activations scaled per row and chunk: module docstring).

    Without thresholds, x is taken as already thresholded (the engine thresholds where Inductor can fuse it into
    the producer of x) and the channels where every row is zero are skipped.

    With a `producer` (see `triton_producers`), x is what the previous projection wrote, in fp32, and the input is
    made from it on the way: SILU_MUL takes x `[rows, 2K]` (gate, then up); ADD_RMS_NORM takes x `[rows, K]`, the
    `residual` to add and the RMSNorm's `norm_weight` and `eps`, and writes the new residual into `residual_out`.
    """
    rows = x.shape[0]
    k, n = wt.shape
    has_thresholds = thresholds is not None
    if has_thresholds and (levels is None or thresholds.shape[-1] != k):
        raise ValueError(f"thresholds need levels and K = {k} columns")
    if not (x.is_contiguous() and wt.is_contiguous() and (not has_thresholds or thresholds.is_contiguous())):
        raise ValueError("sparse_gemv needs contiguous x, Wt and thresholds")
    if rows > MAX_BATCH:
        raise ValueError(f"sparse_gemv takes at most {MAX_BATCH} rows, got {rows}")
    if x.shape[1] != (2 * k if producer == SILU_MUL else k):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, Wt {tuple(wt.shape)}")
    if producer == ADD_RMS_NORM and (residual is None or norm_weight is None or residual_out is None):
        raise ValueError("ADD_RMS_NORM needs residual, norm_weight and residual_out")
    fp8 = wt.dtype == torch.float8_e4m3fn
    if fp8 != (weight_scale is not None):
        raise ValueError("FP8 weights need their weight_scale, and only they take one")
    dtype = dtype or (wt.dtype if not fp8 else x.dtype)
    if dtype not in TRITON_DTYPES or (not fp8 and dtype != wt.dtype):
        raise ValueError(f"activations must be fp16 or bf16, and half-precision weights' own dtype; got {dtype} "
                         f"for {wt.dtype} weights")
    if fp8:
        weight_scale = weight_scale.float().reshape(-1).expand(n).contiguous()
    block_k, block_n, chunks, num_warps, stages = config or _launch_config(k, n, fp8)
    pdl = supports_pdl(x.device)
    chunk = triton.cdiv(k, chunks)
    chunks = triton.cdiv(k, chunk)
    live = torch.empty(k, dtype=torch.int32, device=x.device)
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    values = torch.empty((rows, k), dtype=torch.float16 if fp8 else dtype, device=x.device)
    value_scales = torch.empty((chunks, rows), dtype=torch.float32, device=x.device) if fp8 else y
    counts = torch.empty(chunks, dtype=torch.int32, device=x.device)
    total = rows * n
    block_b = triton.next_power_of_2(max(rows, 2))
    # a chunk of 2,048+ channels (gate_up's two) scans faster with 8 warps: 1.3% off gate_up at batch 2 on an H100;
    # the norm's whole row, too
    warps = 8 if chunk >= 2048 or producer == ADD_RMS_NORM else 4
    _compact_live_channels[(max(chunks, triton.cdiv(total, ZERO_BLOCK)),)](
        x, thresholds if has_thresholds else x, levels if has_thresholds else x, live, values, value_scales, counts, y,
        residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        residual_out if residual_out is not None else x, eps,
        rows, k, chunk, chunks, total,
        BLOCK_B=block_b, CHUNK=triton.next_power_of_2(chunk),
        HAS_THRESHOLDS=has_thresholds, USE_GDC=pdl, ZERO_BLOCK=ZERO_BLOCK, PRODUCER=producer,
        DTYPE=TRITON_DTYPES[dtype], NORM_BLOCK=norm_block(k, block_b), FP16_VALUES=fp8, launch_pdl=pdl,
        num_warps=warps,
    )
    _gather_gemv[(triton.cdiv(n, block_n), chunks)](
        wt, weight_scale if fp8 else y, live, values, value_scales, counts, y, rows, k, n, chunk,
        BLOCK_B=MAX_BATCH, BLOCK_K=block_k, BLOCK_N=block_n, STAGES=stages, NATIVE_DOT=x.is_cuda,
        num_warps=num_warps, USE_GDC=pdl, launch_pdl=pdl, HAS_SCALE=fp8,
    )
    return y
