"""The model families thresher serves, and the projection groups it sparsifies in each.

This table is the one place that says which architectures are supported and what a projection group is: its
Hugging Face module paths (what calibration hooks), its vLLM module path and tensor-parallel sharding (what the engine
patches), the width of its input, and the name of its thresholds in an artifact (`layers.<i>.<group>`). Calibration,
the artifact, the engine, the benchmarks and the tests all read it. It knows nothing of torch or vLLM: paths and class
names are strings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProjectionGroup:
    """Projections of one decoder layer that read the same input, thresholded once for all of them.

    `width` names the input's width: `hidden` (the residual stream), `attention` (heads x head_dim: attention's
    output) or `intermediate` (the MLP's). `sharded`: the input is split across tensor-parallel ranks (row-parallel
    projections), so each rank keeps its slice of the thresholds.
    """

    name: str
    hf_modules: tuple[str, ...]
    vllm_module: str
    sharded: bool
    width: str

    def tensor_name(self, layer: int) -> str:
        return f"layers.{layer}.{self.name}"

    def rank_thresholds(self, table, rank: int, world: int):
        """The thresholds `[levels, in_features]` that tensor-parallel rank `rank` of `world` applies: its slice of the
        input channels for a sharded group (vLLM's row-parallel layers split their input in equal consecutive
        parts), all of them otherwise. Contiguous, as the kernels read it."""
        return table.chunk(world, dim=1)[rank].contiguous() if self.sharded else table


# Every supported family shares the Llama layout: q/k/v and gate/up read the normed residual stream, o reads
# attention's output and down the activated MLP hidden state.
LLAMA_LAYOUT: tuple[ProjectionGroup, ...] = (
    ProjectionGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.qkv_proj",
                    sharded=False, width="hidden"),
    ProjectionGroup("o", ("self_attn.o_proj",), "self_attn.o_proj", sharded=True, width="attention"),
    ProjectionGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_up_proj", sharded=False, width="hidden"),
    ProjectionGroup("down", ("mlp.down_proj",), "mlp.down_proj", sharded=True, width="intermediate"),
)
GROUP_NAMES = tuple(group.name for group in LLAMA_LAYOUT)


@dataclass(frozen=True)
class Family:
    """One supported architecture (`architectures[0]` of a Hugging Face config).

    `vllm_class` is vLLM's model class as `module:Class`; thresher registers `sparse_class`, a subclass of it, with
    vLLM. `qkv_bias`: the q/k/v projections carry biases (Qwen2). `qk_norm`: q and k are RMS-normed per head before
    the rotary embedding (Qwen3).
    """

    architecture: str
    vllm_class: str
    sparse_class: str
    groups: tuple[ProjectionGroup, ...] = LLAMA_LAYOUT
    qkv_bias: bool = False
    qk_norm: bool = False


FAMILIES: dict[str, Family] = {family.architecture: family for family in (
    Family("LlamaForCausalLM", "vllm.model_executor.models.llama:LlamaForCausalLM", "ThresherLlamaForCausalLM"),
    Family("MistralForCausalLM", "vllm.model_executor.models.llama:LlamaForCausalLM", "ThresherMistralForCausalLM"),
    Family("Qwen2ForCausalLM", "vllm.model_executor.models.qwen2:Qwen2ForCausalLM", "ThresherQwen2ForCausalLM",
           qkv_bias=True),
    Family("Qwen3ForCausalLM", "vllm.model_executor.models.qwen3:Qwen3ForCausalLM", "ThresherQwen3ForCausalLM",
           qk_norm=True),
)}


class UnsupportedArchitecture(ValueError):
    """A model whose architecture thresher has no sparse class for."""


def supported_architectures() -> str:
    return ", ".join(FAMILIES)


def family_of(architectures: list[str] | str | None) -> Family:
    """The family of a config's `architectures` (or one name); anything else is an error listing what is supported."""
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise UnsupportedArchitecture(f"architecture {', '.join(names) or 'unknown'} is not supported; thresher serves "
                                  f"{supported_architectures()}")


def family_by_sparse_class(sparse_class: str) -> Family:
    """The family whose sparse class is called `sparse_class` (a KeyError for any other name)."""
    for family in FAMILIES.values():
        if family.sparse_class == sparse_class:
            return family
    raise KeyError(sparse_class)
