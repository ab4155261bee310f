"""Pick the sparse-linear implementation by device, dtype and batch.

Every path computes the same function, threshold(x) @ W^T: a request's sparsity level changes its activations
whatever the batch it lands in. Only the speed differs: the Triton kernel skips weight rows that no row of the
batch keeps, which pays while the batch is small; above the crossover the union of kept channels nears all of
them, and thresholding followed by a dense matmul is faster.

`sparse_linear` is a torch custom op, so torch.compile and CUDA-graph capture see one opaque call whose branch is
decided by the (static, per captured graph) batch size.
"""

from __future__ import annotations

import torch

from thresher.kernels.reference import threshold_activations

# Largest decode batch for which the Triton kernel beats dense cuBLAS at 50% sparsity with independent rows:
# one Llama-3-8B layer on an H100 ran 1.52x at batch 1, 1.13x at 2, 0.94x at 4, 0.86x at 8
# (bench/results/kernels-h100-bf16.json). At 0% sparsity the kernel runs 0.89-0.91x dense.
GPU_SPARSE_MAX_BATCH = 2
_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton kernel needs a CUDA half-precision input, a small batch, and the transposed weight layout."""
    return (x.is_cuda and x.dtype in _TRITON_DTYPES and x.shape[0] <= GPU_SPARSE_MAX_BATCH
            and weight.t().is_contiguous())


@torch.library.custom_op("thresher::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """threshold(x) @ W^T for x `[rows, K]`, W `[N, K]` (any strides), thresholds `[L, K]`, levels `[rows]`.

    Store W as the transpose of a contiguous `[K, N]` tensor (`w.t().contiguous().t()`) to enable the Triton path.
    """
    if use_triton(x, weight):
        from thresher.kernels.triton_sparse import sparse_gemv

        return sparse_gemv(x.contiguous(), weight.t(), thresholds, levels)
    if x.is_cuda:
        from thresher.kernels.triton_sparse import threshold_rows

        return torch.nn.functional.linear(threshold_rows(x.contiguous(), thresholds, levels), weight)
    return torch.nn.functional.linear(threshold_activations(x, thresholds[levels]), weight)


@sparse_linear.register_fake
def _sparse_linear_shape(x, weight, thresholds, levels):
    return x.new_empty((x.shape[0], weight.shape[0]))
