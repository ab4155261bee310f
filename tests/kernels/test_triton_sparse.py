"""The Triton sparse GEMV against the torch reference: on the CPU through TRITON_INTERPRET=1, on a GPU natively.

TRITON_INTERPRET must be set before triton is imported, so this file sets it when no GPU is present.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from thresher.kernels.reference import sparse_linear_reference  # noqa: E402
from thresher.kernels.reference import threshold_activations  # noqa: E402
from thresher.kernels.triton_sparse import sparse_gemv  # noqa: E402

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
