"""The Triton sparse GEMV against the torch reference: on the CPU through TRITON_INTERPRET=1 (`tests/conftest.py`),
on a GPU natively."""

import pytest
import torch

from thresher.kernels.reference import (ADD_RMS_NORM, PLAIN, SILU_MUL, dequantized, fp8_per_token, fp8_weight,
                                        produce_reference, sparse_linear_reference, threshold_activations)
from thresher.kernels.triton_producers import produce_fp8, produce_thresholded
from thresher.kernels.triton_sparse import sparse_gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small on the CPU interpreter; the GPU run adds Llama-3-8B shapes.
SHAPES = [(64, 96), (100, 72), (130, 200)] + ([(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
                                             if DEVICE == "cuda" else [])


def _case(rows, k, n, dtype, levels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    quantiles = torch.tensor([0.0, 0.5, 0.9][:levels])
    # per-channel thresholds: level l zeroes about quantiles[l] of |x| ~ |N(0, 1)|, with channel-to-channel spread
    base = torch.special.ndtri((1 + quantiles) / 2)[:, None] * (0.5 + torch.rand(1, k, generator=g))
    thresholds = base.float()
    per_row_levels = torch.randint(0, levels, (rows,), generator=g)
    return [t.to(DEVICE) for t in (x, w, thresholds, per_row_levels)]


def _reference(x, w, thresholds, per_row_levels):
    return sparse_linear_reference(x.double(), w.double(), thresholds.double(), per_row_levels)


def _check(y, ref, dtype):
    # the kernel returns fp32, for the caller to cast where the cast fuses into its next kernel
    assert y.dtype == torch.float32 and not torch.isnan(y).any()
    error = (y.double() - ref).norm() / ref.norm().clamp(min=1e-12)
    assert error < (2e-2 if dtype == torch.bfloat16 else 4e-3), f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_matches_reference_with_mixed_levels(rows, k, n, dtype):
    x, w, thresholds, levels = _case(rows, k, n, dtype)
    y = sparse_gemv(x, w.t().contiguous(), thresholds, levels)
    _check(y, _reference(x, w, thresholds, levels), dtype)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_fp8_weights_match_the_dequantized_reference(rows, dtype, per_channel):
    """FP8 weight rows gathered and widened in registers, the scales applied per output channel (or one for the
    tensor, as vLLM's online --quantization fp8 makes them)."""
    for k, n in SHAPES:
        x, w, thresholds, levels = _case(rows, k, n, dtype)
        w8, scale = fp8_weight(w, per_channel)
        y = sparse_gemv(x, w8.t().contiguous(), thresholds, levels, weight_scale=scale)
        _check(y, _reference(x, dequantized(w8, scale), thresholds, levels), dtype)


def test_fp8_weights_meet_bf16_activations_of_any_magnitude_exactly():
    # the kernel multiplies FP8 rows in fp16, each row's values of a chunk scaled by a power of two first: rows far
    # outside fp16's range (1e5 overflows it, 1e-6 is below its normal numbers) still get their exact products, so
    # each row's result is the fp64 reference's up to fp32 accumulation (a row of zeros: exactly zero)
    x, w, thresholds, levels = _case(6, 130, 200, torch.bfloat16)
    x = (x.float() * torch.tensor([1e5, 1.0, 1e-6, 3e-30, 1e30, 0.0], device=DEVICE)[:, None]).to(torch.bfloat16)
    w8, scale = fp8_weight(w)
    y = sparse_gemv(x, w8.t().contiguous(), weight_scale=scale)
    reference = x.double() @ dequantized(w8, scale).double().t()
    assert torch.isfinite(y).all()
    for row, want in zip(y.double(), reference):
        assert (row - want).norm() <= 1e-6 * want.norm()


@pytest.mark.parametrize("producer", [SILU_MUL, ADD_RMS_NORM])
def test_fp8_weights_take_their_input_from_the_producers(producer):
    dtype = torch.bfloat16
    for k, n in PRODUCER_SHAPES[producer]:
        source, w, thresholds, levels, residual, norm_weight = _producer_case(producer, 2, k, n, dtype)
        w8, scale = fp8_weight(w)
        residual_out = torch.empty_like(residual)
        y = sparse_gemv(source, w8.t().contiguous(), thresholds, levels, producer=producer, residual=residual,
                        norm_weight=norm_weight, eps=1e-5, residual_out=residual_out, weight_scale=scale, dtype=dtype)
        x_rows, _ = produce_thresholded(producer, source, thresholds, levels, dtype, residual, norm_weight, 1e-5)
        _check(y, x_rows.double() @ dequantized(w8, scale).double().t(), dtype)


def test_fp8_weights_need_their_scales():
    x, w, thresholds, levels = _case(1, 64, 96, torch.bfloat16)
    w8, scale = fp8_weight(w)
    with pytest.raises(ValueError, match="weight_scale"):
        sparse_gemv(x, w8.t().contiguous(), thresholds, levels)
    with pytest.raises(ValueError, match="weight_scale"):
        sparse_gemv(x, w.t().contiguous(), thresholds, levels, weight_scale=scale)
    with pytest.raises(ValueError, match="own dtype"):  # half-precision weights are never narrowed
        sparse_gemv(x, w.t().contiguous(), thresholds, levels, dtype=torch.float16)


@pytest.mark.parametrize("rows", [1, 4])
def test_nothing_above_threshold_gives_zeros(rows):
    x, w, thresholds, levels = _case(rows, 100, 72, torch.float16)
    huge = torch.full_like(thresholds, 1e4)
    y = sparse_gemv(x, w.t().contiguous(), huge, levels)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("rows", [1, 5])
def test_everything_above_threshold_is_the_dense_product(rows):
    x, w, thresholds, _ = _case(rows, 130, 200, torch.float16)
    levels = torch.zeros(rows, dtype=torch.long, device=DEVICE)  # level 0: all thresholds 0
    y = sparse_gemv(x, w.t().contiguous(), thresholds, levels)
    dense = (x.double() @ w.double().t())
    _check(y, dense, torch.float16)


def test_fused_projections_equal_separate_ones():
    x, w, thresholds, levels = _case(2, 96, 160, torch.float16)
    wq, wk = w[:96], w[96:]
    fused = sparse_gemv(x, w.t().contiguous(), thresholds, levels)
    separate = torch.cat([sparse_gemv(x, m.t().contiguous(), thresholds, levels) for m in (wq, wk)], dim=1)
    # equal up to the order in which the chunks' fp32 partial sums arrive (atomics)
    torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6)


def test_more_than_sixteen_rows_is_refused():
    x, w, thresholds, _ = _case(17, 64, 96, torch.float16)
    with pytest.raises(ValueError, match="at most 16 rows"):
        sparse_gemv(x, w.t().contiguous(), thresholds, torch.zeros(17, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_prethresholded_input_matches_the_reference(rows, dtype):
    # the engine's mode: x thresholded upstream (where Inductor fuses it), no thresholds passed to the kernel
    x, w, thresholds, levels = _case(rows, 130, 200, dtype)
    y = sparse_gemv(threshold_activations(x, thresholds[levels]), w.t().contiguous())
    _check(y, _reference(x, w, thresholds, levels), dtype)


@pytest.mark.parametrize("rows", [1, 2])
def test_channels_zero_in_every_row_are_never_read(rows):
    x, w, thresholds, _ = _case(rows, 130, 200, torch.float16)
    x = threshold_activations(x, thresholds[2])  # the 90% level for every row
    skipped = (x == 0).all(dim=0)
    assert skipped.any()
    wt = w.t().contiguous()
    wt[skipped] = float("nan")  # any read of a skipped channel's weight row would poison the output
    y = sparse_gemv(x, wt)
    _check(y, x.double() @ w.double().t(), torch.float16)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("rows", [1, 4])
def test_many_chunks_add_up_call_after_call(rows, stages):
    # nine chunks of input channels each leave a partial sum; repeated calls must each add up only their own (both
    # gather loops: the prefetching one, and Triton's pipelined one)
    x, w, thresholds, levels = _case(rows, 300, 72, torch.float16)
    config = (16, 32, 9, 4, stages)
    ref = _reference(x, w, thresholds, levels)
    for _ in range(3):
        _check(sparse_gemv(x, w.t().contiguous(), thresholds, levels, config=config), ref, torch.float16)


# (K, N) per producer; on the GPU also the Llama-3-8B projections each producer feeds (q/k/v and gate/up after the
# norm, down after SiLU-and-multiply, o after attention)
PRODUCER_SHAPES = {
    PLAIN: [(100, 72)] + ([(4096, 4096)] if DEVICE == "cuda" else []),
    SILU_MUL: [(100, 72)] + ([(14336, 4096)] if DEVICE == "cuda" else []),
    ADD_RMS_NORM: [(1100, 72)] + ([(4096, 6144), (4096, 28672)] if DEVICE == "cuda" else []),
}


def _producer_case(producer, rows, k, n, dtype):
    """The previous projection's fp32 output (scaled like a residual stream's), a residual, a norm weight, and a
    thresholds table whose levels keep all / ~half / ~a tenth of the activations produced from 64 other rows."""
    _, w, _, levels = _case(rows, k, n, dtype)
    g = torch.Generator().manual_seed(1)
    source = 4 * torch.randn(rows + 64, 2 * k if producer == SILU_MUL else k, generator=g)
    source = (source.to(dtype) if producer == PLAIN else source).to(DEVICE)
    residual = (4 * torch.randn(rows + 64, k, generator=g)).to(dtype).to(DEVICE)
    norm_weight = (1 + 0.2 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    produced, _ = produce_reference(producer, source[rows:], dtype, residual[rows:], norm_weight, 1e-5)
    magnitudes = produced.abs().float()
    thresholds = torch.stack([torch.zeros(k, device=DEVICE), magnitudes.median(dim=0).values,
                              magnitudes.quantile(0.9, dim=0)]).contiguous()
    return source[:rows].contiguous(), w, thresholds, levels, residual[:rows].contiguous(), norm_weight


@pytest.mark.parametrize("producer", [PLAIN, SILU_MUL, ADD_RMS_NORM])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_producers_inside_the_kernel_match_the_reference(producer, dtype, rows):
    # the engine's fused mode: the compaction makes x from the previous projection's fp32 output, thresholds it and
    # (under ADD_RMS_NORM) writes the new residual; the row kernel does the same for the dense path
    for k, n in PRODUCER_SHAPES[producer]:
        source, w, thresholds, levels, residual, norm_weight = _producer_case(producer, rows, k, n, dtype)
        x, residual_ref = produce_reference(producer, source, dtype, residual, norm_weight, 1e-5)
        x_ref = threshold_activations(x, thresholds[levels])
        residual_out = torch.empty_like(residual)
        y = sparse_gemv(source, w.t().contiguous(), thresholds, levels, producer=producer, residual=residual,
                        norm_weight=norm_weight, eps=1e-5, residual_out=residual_out)
        x_rows, residual_rows = produce_thresholded(producer, source, thresholds, levels, dtype, residual,
                                                    norm_weight, 1e-5)
        assert x_rows.dtype == dtype
        # the interpreter's bf16 rounding (toward zero) moves some cut-offs: there the row kernel's x is the truth
        exact_rounding = DEVICE == "cuda" or dtype == torch.float16
        _check(y, (x_ref if exact_rounding else x_rows).double() @ w.double().t(), dtype)
        # the norm's sum runs in another order than torch's, which can move a rounding and with it a cut-off; the
        # CPU interpreter also rounds to bf16 toward zero, one unit in the last place off
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        kept = (x_rows != 0) & (x_ref != 0)
        torch.testing.assert_close(x_rows[kept].float(), x_ref[kept].float(), rtol=2 * ulp,
                                   atol=4 * ulp * x_ref.float().abs().max())
        assert ((x_rows != 0) != (x_ref != 0)).float().mean() < (1e-3 if exact_rounding else 2e-2)
        if producer == ADD_RMS_NORM:
            for produced in (residual_out, residual_rows):
                torch.testing.assert_close(produced.float(), residual_ref.float(), rtol=ulp,
                                           atol=2 * ulp * source.abs().max())


@pytest.mark.parametrize("producer", [PLAIN, SILU_MUL, ADD_RMS_NORM])
def test_the_row_kernel_spreads_few_rows_over_programs_without_changing_them(producer):
    # 3 rows: each row's 1,100 channels split over two programs (each summing the whole row for the norm); 160
    # rows: one program per row
    source, _, thresholds, levels, residual, norm_weight = _producer_case(producer, 160, 1100, 8, torch.bfloat16)
    many = produce_thresholded(producer, source, thresholds, levels, torch.bfloat16, residual, norm_weight, 1e-5)
    few = produce_thresholded(producer, source[:3].contiguous(), thresholds, levels[:3], torch.bfloat16,
                              residual[:3].contiguous(), norm_weight, 1e-5)
    assert torch.equal(few[0], many[0][:3]) and few[0].count_nonzero() > 0
    if producer == ADD_RMS_NORM:
        assert torch.equal(few[1], many[1][:3])


@pytest.mark.parametrize("producer", [PLAIN, SILU_MUL, ADD_RMS_NORM])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_fp8_row_kernel_quantizes_what_the_row_kernel_makes_per_token(producer, rows):
    # before vLLM's FP8 GEMM (batches the Triton kernel does not take): x made, thresholded and quantized per row in
    # one kernel, as vLLM's per-token quantization of the row kernel's x would
    for k, n in PRODUCER_SHAPES[producer]:
        source, _, thresholds, levels, residual, norm_weight = _producer_case(producer, rows, k, n, torch.bfloat16)
        x, residual_rows = produce_thresholded(producer, source, thresholds, levels, torch.bfloat16, residual,
                                               norm_weight, 1e-5)
        x8, scales, residual_out = produce_fp8(producer, source, thresholds, levels, torch.bfloat16, residual,
                                               norm_weight, 1e-5)
        x8_ref, scales_ref = fp8_per_token(x)
        assert x8.dtype == torch.float8_e4m3fn and scales.shape == (rows, 1) and x8.float().count_nonzero() > 0
        torch.testing.assert_close(scales, scales_ref, rtol=1e-6, atol=0)
        values, values_ref = x8.float(), x8_ref.float()
        if DEVICE == "cpu":
            # Triton's interpreter rounds to e4m3 in software: a value that rounds up to a power of two comes out as
            # half that power (the mantissa's carry never reaches the exponent), ties go away from zero, subnormals
            # are truncated; GPUs round in hardware, to nearest even
            values = torch.where((values * 2 == values_ref) & (torch.frexp(values_ref).mantissa.abs() == 0.5),
                                 values_ref, values)
        # the norm sums the row in another order than the row kernel's tiles, which can move a rounding of x, and
        # with it, rarely, an e4m3 value by one step
        step = (values_ref.abs() / 8).clamp(min=2**-9)
        assert ((values - values_ref).abs() <= step).all()
        assert (values != values_ref).float().mean() < (1e-2 if DEVICE == "cuda" else 5e-2)
        if producer == ADD_RMS_NORM:
            assert torch.equal(residual_out, residual_rows)


def test_a_silu_mul_source_must_hold_gate_and_up():
    source, w, thresholds, levels, *_ = _producer_case(SILU_MUL, 1, 100, 72, torch.float16)
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse_gemv(source[:, :100].contiguous(), w.t().contiguous(), thresholds, levels, producer=SILU_MUL)
