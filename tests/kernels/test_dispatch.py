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
    torch.testing.assert_close(compiled(x, w, thresholds, levels), 2 * sparse_linear_reference(x, w, thresholds, levels))


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
