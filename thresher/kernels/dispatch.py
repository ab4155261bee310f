"""Pick the sparse-linear implementation by device, dtype and batch.

The caller thresholds x first, in plain torch (`reference.threshold_activations`), so that torch.compile's Inductor
fuses the thresholding into the kernel that made x (in a Llama layer: the RMSNorm before q/k/v and gate/up, the
SiLU-and-multiply before down), where it costs no pass of its own. What reaches `sparse_linear` is x with its skipped
activations already zero, and every path computes x @ W^T: a request's sparsity level changes its activations
whatever the batch it lands in. Only the speed differs: the Triton kernel skips the weight rows of channels that are
zero in every row of the batch, which pays while the batch is small; above the crossover the union of kept channels
nears all of them, and the dense matmul is faster.

The result is fp32 on every path (the kernel adds its partial sums into fp32; cuBLAS writes fp32 from the same fp32
accumulators at no extra cost), and the caller casts it in plain torch, where Inductor fuses the cast into the next
kernel: a separate pass to add the kernel's partial sums and cast would cost ~1 us per projection. At prefill this
doubles the memory of the projection outputs (gate_up of Llama-3-8B at 8,192 tokens: 0.94 GB instead of 0.47 GB),
which vLLM's memory profiling sees before it sizes the KV cache.

`sparse_linear` is a torch custom op, so torch.compile and CUDA-graph capture see one opaque call whose branch is
decided by the (static, per captured graph) batch size.
"""

from __future__ import annotations

import torch

# Largest decode batch for which the Triton kernel clearly beats dense cuBLAS at 50% sparsity with independent rows:
# one Llama-3-8B layer on an H100 ran 1.71x at batch 1, 1.25x at 2, 1.03x at 4 (0.98x at 0-25%), 0.93x at 8
# (bench/results/kernels-h100-bf16.json). At 0% sparsity the kernel runs 0.99-1.01x dense at batch 1-2.
GPU_SPARSE_MAX_BATCH = 2
_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton kernel needs a CUDA half-precision input, a small batch, and the transposed weight layout."""
    return (x.is_cuda and x.dtype in _TRITON_DTYPES and x.shape[0] <= GPU_SPARSE_MAX_BATCH
            and weight.t().is_contiguous())


@torch.library.custom_op("thresher::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T in fp32 for a thresholded x `[rows, K]` and W `[N, K]` (any strides), skipping channels zero in every
    row.

    Store W as the transpose of a contiguous `[K, N]` tensor (`w.t().contiguous().t()`) to enable the Triton path.
    """
    if use_triton(x, weight):
        from thresher.kernels.triton_sparse import sparse_gemv

        return sparse_gemv(x.contiguous(), weight.t())
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(x, weight).float()


@sparse_linear.register_fake
def _sparse_linear_shape(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
