import pytest
import torch

from thresher.kernels.dispatch import sparse_linear, use_triton
from thresher.kernels.reference import sparse_linear_reference, threshold_activations


def _thresholded_linear(x, weight, thresholds, levels):
    """What the engine runs: threshold in plain torch (where Inductor fuses it), then the opaque op."""
    return sparse_linear(threshold_activations(x, thresholds[levels]), weight)


def test_cpu_path_equals_the_reference_for_any_weight_layout():
    torch.manual_seed(0)
    x, w = torch.randn(5, 48), torch.randn(40, 48)
    thresholds = torch.stack([torch.zeros(48), torch.rand(48), torch.rand(48) * 2])
    levels = torch.tensor([0, 1, 2, 1, 0])
    expected = sparse_linear_reference(x, w, thresholds, levels)
    transposed_storage = w.t().contiguous().t()
    for weight in (w, transposed_storage):
        assert not use_triton(x, weight)
        torch.testing.assert_close(_thresholded_linear(x, weight, thresholds, levels), expected)


def test_level_zero_is_bitwise_dense():
    torch.manual_seed(1)
    x, w = torch.randn(3, 32), torch.randn(16, 32)
    thresholds = torch.stack([torch.zeros(32), torch.ones(32)])
    dense = torch.nn.functional.linear(x, w)
    assert torch.equal(_thresholded_linear(x, w, thresholds, torch.zeros(3, dtype=torch.long)), dense)


def test_threshold_and_op_compile_in_one_graph():
    torch.manual_seed(2)
    x, w = torch.randn(2, 32), torch.randn(16, 32)
    thresholds = torch.stack([torch.zeros(32), torch.full((32,), 0.5)])
    levels = torch.tensor([1, 0])
    compiled = torch.compile(lambda *a: _thresholded_linear(*a) * 2, fullgraph=True)
    expected = 2 * sparse_linear_reference(x, w, thresholds, levels)
    torch.testing.assert_close(compiled(x, w, thresholds, levels), expected)


def test_half_precision_input_gives_an_fp32_result_for_the_caller_to_cast():
    # every path returns fp32 (the Triton kernel accumulates into it with atomics); the engine casts after the op
    torch.manual_seed(3)
    x, w = torch.randn(4, 32).to(torch.bfloat16), torch.randn(16, 32).to(torch.bfloat16)
    thresholds = torch.stack([torch.zeros(32), torch.full((32,), 0.5)])
    levels = torch.tensor([1, 0, 1, 1])
    y = _thresholded_linear(x, w, thresholds, levels)
    assert y.dtype == torch.float32
    expected = sparse_linear_reference(x.float(), w.float(), thresholds, levels)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=5e-2)


def test_fused_ops_equal_producer_then_threshold_then_linear_and_compile():
    # the fused layer's ops (on the CPU: the torch reference of each producer, then the matmul), under torch.compile
    # as vLLM runs them: the fake implementations must give the real shapes and dtypes
    from thresher.kernels.dispatch import add_rms_norm_linear, silu_mul_linear, threshold_linear
    from thresher.kernels.reference import add_rms_norm_reference, silu_mul_reference

    torch.manual_seed(4)
    k, n, rows = 32, 16, 3
    w = torch.randn(n, k).to(torch.bfloat16)
    thresholds = torch.stack([torch.zeros(k), torch.rand(k)])
    levels = torch.tensor([1, 0, 1, 0, 0])  # longer than the batch, as the engine's level buffer is
    y, gate_up = torch.randn(rows, k), torch.randn(rows, 2 * k)
    residual, norm_weight = torch.randn(rows, k).to(torch.bfloat16), torch.rand(k).to(torch.bfloat16)

    def linear(x):
        return sparse_linear(threshold_activations(x, thresholds[levels[:rows]]), w)

    def fused(y, gate_up, residual):
        return (threshold_linear(residual, w, thresholds, levels), silu_mul_linear(gate_up, w, thresholds, levels),
                *add_rms_norm_linear(y, residual, norm_weight, 1e-5, w, thresholds, levels))

    normed, new_residual = add_rms_norm_reference(y, residual, norm_weight, 1e-5)
    expected = (linear(residual), linear(silu_mul_reference(gate_up, torch.bfloat16)), linear(normed), new_residual)
    for run in (fused, torch.compile(fused, fullgraph=True)):
        for got, want in zip(run(y, gate_up, residual), expected):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's FP8 GEMM and the Triton kernel need a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_fp8_weights_take_the_sparse_kernel_or_vllms_fp8_gemm(rows):
    # FP8 weights as the engine holds them: rows for the Triton kernel (batches of 1-2, activations kept in bf16) and
    # vLLM's K-major layout for its FP8 GEMM (larger batches, activations rounded to e4m3 per token)
    from thresher.kernels.dispatch import GPU_SPARSE_MAX_BATCH, add_rms_norm_linear, threshold_linear
    from thresher.kernels.reference import add_rms_norm_reference, dequantized, fp8_weight

    torch.manual_seed(5)
    k, n = 4096, 6144
    w8, scale = fp8_weight((torch.randn(n, k) / k**0.5).to(torch.bfloat16), per_channel=False)
    w8, scale = w8.cuda(), scale.cuda().expand(n).contiguous()
    weights = (w8.t().contiguous().t(), scale, w8.t())
    thresholds = torch.stack([torch.zeros(k), torch.full((k,), 0.7)]).cuda()
    levels = torch.arange(rows, device="cuda") % 2
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    y, residual = torch.randn(rows, k, device="cuda"), torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    norm_weight = torch.rand(k, device="cuda").to(torch.bfloat16)
    normed, new_residual = add_rms_norm_reference(y, residual, norm_weight, 1e-5)
    reference = dequantized(w8, scale).double()
    # W8A16 gathers the kept rows exactly; W8A8 rounds each activation to e4m3 (3 mantissa bits)
    tolerance = 1e-2 if rows <= GPU_SPARSE_MAX_BATCH else 5e-2
    for got, x_in in ((threshold_linear(x, weights[0], thresholds, levels, *weights[1:]), x),
                      (add_rms_norm_linear(y, residual, norm_weight, 1e-5, weights[0], thresholds, levels,
                                           *weights[1:])[0], normed)):
        want = threshold_activations(x_in, thresholds[levels]).double() @ reference.t()
        assert got.dtype == torch.float32
        assert (got.double() - want).norm() / want.norm() < tolerance
    torch.testing.assert_close(add_rms_norm_linear(y, residual, norm_weight, 1e-5, weights[0], thresholds, levels,
                                                   *weights[1:])[1], new_residual)
