"""Sparse Llama-family models for vLLM: the stock model, with every projection input thresholded per token.

Each decoder layer's q/k/v, o, gate/up and down projections get the artifact's thresholds for their input
(`[levels, in_features]`, row-parallel inputs sliced to this rank's shard) and read the level of every token from
`TokenLevels`. Level 0 thresholds are zeros, which keep every activation: dense requests are exactly stock vLLM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaForCausalLM

from thresher.artifact import load_artifact, model_identity
from thresher.engine.token_levels import TokenLevels, activate
from thresher.kernels.reference import threshold_activations

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
        # integer counters: float scalars inside compiled graphs trip torch.compile's scalar analysis
        self.register_buffer("skipped", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("total", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    def add(self, x: torch.Tensor, sparse_rows: torch.Tensor, out_features: int) -> None:
        rows = sparse_rows[:, None].expand_as(x)
        self.skipped.add_(((x == 0) & rows).sum() * out_features)
        self.total.add_(rows.sum() * out_features)

    def read_and_reset(self) -> float:
        value = self.skipped.item() / self.total.item() if self.total.item() > 0 else 0.0
        self.skipped.zero_()
        self.total.zero_()
        return value


class ThresherWorkerExtension:
    """vLLM worker extension (`worker_extension_cls`): `llm.collective_rpc("thresher_decode_sparsity")` returns, per
    worker, the weighted activation sparsity of decode tokens since the last call."""

    def thresher_decode_sparsity(self) -> float:
        return self.model_runner.get_model().sparsity_meter.read_and_reset()


class _ThresholdedInput(torch.nn.Module):
    """A forward pre-hook for one projection: threshold its input by each token's level."""

    def __init__(self, thresholds: torch.Tensor, token_levels: TokenLevels, meter: SparsityMeter, out_features: int):
        super().__init__()
        self.register_buffer("thresholds", thresholds, persistent=False)
        self.token_levels = token_levels
        self.meter = meter
        self.out_features = out_features

    def __call__(self, _module, args):
        x = args[0]
        levels = self.token_levels.buffer[: x.shape[0]]
        x = threshold_activations(x, self.thresholds[levels])
        if self.meter.enabled:
            self.meter.add(x, levels > 0, self.out_features)
        return (x, *args[1:])


class ThresherLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with the thresholds of a thresher artifact on every projection input."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        artifact_dir = getattr(hf_config, "thresher_artifact", None)
        if not artifact_dir:
            raise ValueError("ThresherLlamaForCausalLM needs hf_overrides['thresher_artifact'] (an artifact directory)")
        model_path = Path(vllm_config.model_config.model)
        artifact = load_artifact(artifact_dir, model=model_identity(model_path, model_path.name))
        device = next(self.parameters()).device
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.token_levels = TokenLevels(artifact.levels, max_tokens, device)
        activate(self.token_levels)
        self.sparsity_meter = SparsityMeter(device)
        self.threshold_hooks = torch.nn.ModuleList()
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        for index, layer in enumerate(self.model.layers):
            for group, (path, sharded) in PROJECTIONS.items():
                table = artifact.thresholds[f"layers.{index}.{group}"]
                if sharded:
                    table = table.chunk(world, dim=1)[rank]
                projection = layer.get_submodule(path)
                hook = _ThresholdedInput(table.to(device).contiguous(), self.token_levels, self.sparsity_meter,
                                         projection.output_size)
                self.threshold_hooks.append(hook)
                projection.register_forward_pre_hook(hook)
        log.info("thresher: %d layers sparsified with levels %s (%s)", len(self.model.layers), artifact.levels,
                 artifact.method)


class ThresherMistralForCausalLM(ThresherLlamaForCausalLM):
    """Mistral shares Llama's decoder layout in vLLM."""
