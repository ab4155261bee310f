"""Pick the sparse-linear implementation by device, dtype and batch.

The caller of `sparse_linear` thresholds x first, in plain torch (`reference.threshold_activations`), so that
torch.compile's Inductor fuses the thresholding into the kernel that made x (in a Llama layer: the RMSNorm before
q/k/v and gate/up, the SiLU-and-multiply before down), where it costs no pass of its own. What reaches
`sparse_linear` is x with its skipped activations already zero, and every path computes x @ W^T: a request's sparsity
level changes its activations whatever the batch it lands in. Only the speed differs: the Triton kernel skips the
weight rows of channels that are zero in every row of the batch, which pays while the batch is small; above the
crossover the union of kept channels nears all of them, and the dense matmul is faster.

The result is fp32 on every path (the kernel adds its partial sums into fp32; cuBLAS writes fp32 from the same fp32
accumulators at no extra cost); the next fused op reads it as it is, and the unfused layer casts it in plain torch,
where Inductor fuses the cast into the next kernel: a separate pass to add the kernel's partial sums and cast would
cost ~1 us per projection. At prefill this doubles the memory of the projection outputs (gate_up of Llama-3-8B at
8,192 tokens: 0.94 GB instead of 0.47 GB), which vLLM's memory profiling sees before it sizes the KV cache.

`sparse_linear` is a torch custom op, so torch.compile and CUDA-graph capture see one opaque call whose branch is
decided by the (static, per captured graph) batch size.

The fused ops (`threshold_linear`, `silu_mul_linear`, `add_rms_norm_linear`) take the previous projection's fp32
output instead of x, with the thresholds and the per-row levels, and make x themselves (`triton_producers`): inside
the Triton kernel's compaction at small batches, which saves the producing kernel's launch and x's round trip through
memory (one Llama-3-8B layer at batch 1, 50%, on an H100: 114.8 -> 111.6 us in vLLM), or in one row kernel before
cuBLAS above the crossover. The engine's CUDA decoder layer is built from them; `sparse_linear` serves the CPU engine
and the engine with its sparsity meter on, which must see x.

FP8 weights (e4m3 with fp32 scales, one per output channel or one for the tensor, as vLLM's FP8 linear layers hold
them) come in two layouts, one per kernel: `weight` in the Triton kernel's (a contiguous row per input channel, so
that a kept channel is one contiguous read) and `dense_weight` in vLLM's (K-major, which FP8 tensor cores need).
Small batches gather the kept FP8 rows and widen them in registers, with the activations kept in half precision
(W8A16); larger ones run vLLM's own FP8 GEMM (per-token FP8 quantization of x, then CUTLASS's scaled matmul), as
stock vLLM serving `--quantization fp8` does (W8A8). The fused ops quantize x in the row kernel that makes it
(`triton_producers.produce_fp8`), as stock vLLM's Inductor fuses the quantization into the RMSNorm. So on FP8
weights the batch changes more than the speed: a decode batch of 1-2 rounds its activations less than a larger one
(stock FP8 rounds them at every batch).
"""

from __future__ import annotations

import torch

from thresher.kernels.reference import ADD_RMS_NORM, PLAIN, SILU_MUL, produce_reference, threshold_activations

# Largest decode batch for which the Triton kernel clearly beats dense cuBLAS at 50% sparsity with independent rows:
# one Llama-3-8B layer on an H100 ran 1.71x at batch 1, 1.25x at 2, 1.03x at 4 (0.98x at 0-25%), 0.93x at 8
# (bench/results/kernels-h100-bf16.json). At 0% sparsity the kernel runs 0.99-1.01x dense at batch 1-2.
GPU_SPARSE_MAX_BATCH = 2
_TRITON_DTYPES = (torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn
# the activations FP8 weights meet: x is only rounded to e4m3 (dense path) or multiplied by widened e4m3 rows (the
# Triton kernel), and bf16 holds more than either keeps, over fp16's range and more
FP8_ACTIVATION_DTYPE = torch.bfloat16


def use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton kernel needs CUDA, half-precision or FP8 weights, a small batch, and the transposed weight
    layout."""
    return (x.is_cuda and weight.dtype in (*_TRITON_DTYPES, FP8) and x.shape[0] <= GPU_SPARSE_MAX_BATCH
            and weight.t().is_contiguous())


def activation_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a projection's input is made in: its weights', or bf16 before FP8 weights."""
    return FP8_ACTIVATION_DTYPE if weight.dtype == FP8 else weight.dtype


def _dense(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
           dense_weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dtype == FP8:  # CUDA only (`thresher serve` refuses FP8 elsewhere)
        from vllm import _custom_ops as vllm_ops

        quantized, x_scale = vllm_ops.scaled_fp8_quant(x.contiguous(), use_per_token_if_dynamic=True)
        return _fp8_gemm(quantized, x_scale, weight_scale, dense_weight)
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(x, weight).float()


def _fp8_gemm(x8: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor | None,
              dense_weight: torch.Tensor | None) -> torch.Tensor:
    """vLLM's FP8 GEMM (CUTLASS's scaled matmul) on x quantized per token, in fp32."""
    if dense_weight is None or weight_scale is None:
        raise ValueError("FP8 weights need their weight_scale and their dense_weight (vLLM's K-major layout) for "
                         "batches the Triton kernel does not take")
    from vllm import _custom_ops as vllm_ops

    return vllm_ops.cutlass_scaled_mm(x8, dense_weight, x_scale, weight_scale, out_dtype=FP8_ACTIVATION_DTYPE).float()


@torch.library.custom_op("thresher::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                  dense_weight: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T in fp32 for a thresholded x `[rows, K]` and W `[N, K]` (any strides), skipping channels zero in every
    row. FP8 weights bring their fp32 `weight_scale` (`[N]`) and their `dense_weight` (module docstring).

    Store W as the transpose of a contiguous `[K, N]` tensor (`w.t().contiguous().t()`) to enable the Triton path.
    """
    if use_triton(x, weight):
        from thresher.kernels.triton_sparse import sparse_gemv

        return sparse_gemv(x.contiguous(), weight.t(), weight_scale=weight_scale)
    return _dense(x, weight, weight_scale, dense_weight)


@sparse_linear.register_fake
def _sparse_linear_shape(x, weight, weight_scale=None, dense_weight=None):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _produced_linear(producer: int, source: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor,
                     levels: torch.Tensor, residual: torch.Tensor | None = None,
                     norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                     weight_scale: torch.Tensor | None = None, dense_weight: torch.Tensor | None = None):
    """(threshold(x) @ W^T in fp32, new residual or None), x made from `source` by `producer` (see
    `triton_producers`): in the compaction of the Triton kernel at small batches, else in a kernel of its own (the
    torch reference off CUDA) before the dense matmul."""
    levels = levels[: source.shape[0]]
    dtype = activation_dtype(weight)
    if use_triton(source, weight):
        from thresher.kernels.triton_sparse import sparse_gemv

        residual_out = torch.empty_like(residual) if producer == ADD_RMS_NORM else None
        y = sparse_gemv(source.contiguous(), weight.t(), thresholds, levels, producer=producer, residual=residual,
                        norm_weight=norm_weight, eps=eps, residual_out=residual_out, weight_scale=weight_scale,
                        dtype=dtype)
        return y, residual_out
    if source.is_cuda and weight.dtype == FP8:
        from thresher.kernels.triton_producers import produce_fp8

        x8, x_scale, residual_out = produce_fp8(producer, source.contiguous(), thresholds, levels, dtype, residual,
                                                norm_weight, eps)
        return _fp8_gemm(x8, x_scale, weight_scale, dense_weight), residual_out
    if source.is_cuda and dtype in _TRITON_DTYPES:
        from thresher.kernels.triton_producers import produce_thresholded

        x, residual_out = produce_thresholded(producer, source.contiguous(), thresholds, levels, dtype,
                                              residual, norm_weight, eps)
        return _dense(x, weight, weight_scale, dense_weight), residual_out
    x, residual_out = produce_reference(producer, source, dtype, residual, norm_weight, eps)
    return _dense(threshold_activations(x, thresholds[levels]), weight, weight_scale, dense_weight), residual_out


@torch.library.custom_op("thresher::threshold_linear", mutates_args=())
def threshold_linear(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor,
                     weight_scale: torch.Tensor | None = None,
                     dense_weight: torch.Tensor | None = None) -> torch.Tensor:
    """threshold(x) @ W^T in fp32, each row of x `[rows, K]` thresholded by its level (`thresholds [L, K]`,
    `levels [>= rows]`): for an input that no kernel of the model's can threshold on the way (o's, which attention
    makes). The Triton kernel thresholds in its compaction, where it costs no launch of its own."""
    return _produced_linear(PLAIN, x, weight, thresholds, levels, weight_scale=weight_scale,
                            dense_weight=dense_weight)[0]


@torch.library.custom_op("thresher::silu_mul_linear", mutates_args=())
def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor,
                    weight_scale: torch.Tensor | None = None, dense_weight: torch.Tensor | None = None) -> torch.Tensor:
    """threshold(silu(gate) * up) @ W^T in fp32 for the fp32 output `[rows, 2K]` of a gate/up projection."""
    return _produced_linear(SILU_MUL, gate_up, weight, thresholds, levels, weight_scale=weight_scale,
                            dense_weight=dense_weight)[0]


@torch.library.custom_op("thresher::add_rms_norm_linear", mutates_args=())
def add_rms_norm_linear(y: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor,
                        weight_scale: torch.Tensor | None = None,
                        dense_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold(RMSNorm(y + residual)) @ W^T in fp32, y + residual) for the fp32 output y `[rows, K]` of the
    previous projection: a Llama layer's residual add and RMSNorm before q/k/v or gate/up."""
    return _produced_linear(ADD_RMS_NORM, y, weight, thresholds, levels, residual, norm_weight, eps, weight_scale,
                            dense_weight)


@threshold_linear.register_fake
def _threshold_linear_shape(x, weight, thresholds, levels, weight_scale=None, dense_weight=None):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


@silu_mul_linear.register_fake
def _silu_mul_linear_shape(gate_up, weight, thresholds, levels, weight_scale=None, dense_weight=None):
    return gate_up.new_empty((gate_up.shape[0], weight.shape[0]), dtype=torch.float32)


@add_rms_norm_linear.register_fake
def _add_rms_norm_linear_shape(y, residual, norm_weight, eps, weight, thresholds, levels, weight_scale=None,
                               dense_weight=None):
    return y.new_empty((y.shape[0], weight.shape[0]), dtype=torch.float32), torch.empty_like(residual)
