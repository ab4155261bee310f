"""Registration with vLLM: model classes, and the runner hook that tells the model each token's sparsity level."""

from __future__ import annotations

import os

SPARSE_ARCHITECTURES = {
    "LlamaForCausalLM": "ThresherLlamaForCausalLM",
    "MistralForCausalLM": "ThresherMistralForCausalLM",
}
# SamplingParams.extra_args key holding a request's sparsity level (a calibrated fraction; absent or 0.0 = dense).
SPARSITY_EXTRA_ARG = "thresher_sparsity"


def engine_overrides(model_path: str | os.PathLike, artifact_dir: str | os.PathLike) -> dict:
    """`hf_overrides` that make vLLM build thresher's sparse class for this model and artifact.

    The artifact is checked against the model here, in the calling process, so a mismatch fails before any
    engine process starts, with an `ArtifactError` naming both models.
    """
    from pathlib import Path

    from thresher.artifact import load_artifact, model_identity

    path = Path(model_path)
    identity = model_identity(path, path.name)
    load_artifact(artifact_dir, model=identity)
    architecture = identity.architecture
    if architecture not in SPARSE_ARCHITECTURES:
        raise ValueError(f"thresher has no sparse class for {architecture}; supported: {', '.join(SPARSE_ARCHITECTURES)}")
    return {"architectures": [SPARSE_ARCHITECTURES[architecture]], "thresher_artifact": str(artifact_dir)}


def request_extras(sparsity: float, steering=None) -> tuple[dict, str | None]:
    """A request's `SamplingParams.extra_args` and prompt `cache_salt` for a sparsity level and a steering spec.

    The salt keeps the prefix cache from serving KV computed under one steering spec to a request with another
    (or none); sparsity needs none, since prefill runs dense at every level.
    """
    from thresher.steering import STEERING_EXTRA_ARG

    extra_args = {SPARSITY_EXTRA_ARG: sparsity}
    if steering is None or steering.is_empty():
        return extra_args, None
    extra_args[STEERING_EXTRA_ARG] = steering.model_dump()
    return extra_args, steering.cache_key()


def register() -> None:
    """Entry point of `vllm.general_plugins`; vLLM calls it in every process, possibly more than once."""
    from vllm import ModelRegistry

    for sparse_name in SPARSE_ARCHITECTURES.values():
        if sparse_name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(sparse_name, f"thresher.engine.sparse_llama:{sparse_name}")
    from thresher.engine.runner_hooks import install_v1_hook

    install_v1_hook()
