"""Pick the sparse-linear implementation by device, dtype and batch.

Every path computes the same function, threshold(x) @ W^T: a request's sparsity level changes its activations
whatever the batch it lands in. Only the speed differs: the Triton kernel skips weight rows that no row of the
batch keeps, which pays while the batch is small; above the crossover the union of kept channels nears all of
them, and thresholding followed by a dense matmul is faster.
"""

from __future__ import annotations

import torch

from thresher.kernels.reference import threshold_activations

# Largest decode batch for which the Triton kernel beats dense cuBLAS at 50% sparsity with independent rows:
# one Llama-3-8B layer on an H100 ran 1.49x at batch 1, 1.09x at 2, 0.84x at 4, 0.75x at 8
# (bench/results/kernels-h100-bf16.json). At 0% sparsity the kernel runs 0.90-0.91x dense.
GPU_SPARSE_MAX_BATCH = 2
_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _TRITON_DTYPES and x.shape[0] <= GPU_SPARSE_MAX_BATCH


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """threshold(x) @ Wt for x `[rows, K]`, Wt `[K, N]` (transposed weight), thresholds `[L, K]`, levels `[rows]`."""
    if use_triton(x):
        from thresher.kernels.triton_sparse import sparse_gemv

        return sparse_gemv(x, wt, thresholds, levels)
    return torch.matmul(threshold_activations(x, thresholds[levels]), wt)
