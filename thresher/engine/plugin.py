"""Registration with vLLM: one sparse model class per supported family, the runner hook that tells the model each
token's sparsity level, steering slot and attention budget, and the KV-cache sizing that leaves room for the attention
page summaries."""

from __future__ import annotations

import os

from thresher.families import FAMILIES, family_of

SPARSE_MODELS_MODULE = "thresher.engine.sparse_models"
# the model config key (through `hf_overrides`) that says whether attention budgets are wired
ATTENTION_BUDGETS_KEY = "thresher_attention_budgets"


def engine_overrides(model_path: str | os.PathLike, artifact_dir: str | os.PathLike,
                     attention_budgets: bool = True) -> dict:
    """`hf_overrides` that make vLLM build thresher's sparse class for this model and artifact, with per-request
    attention budgets wired into its attention or not (on GPUs the wiring costs dense decode steps a few percent).

    The artifact is checked against the model here, in the calling process, so a mismatch fails before any
    engine process starts, with an `ArtifactError` naming both models.
    """
    from pathlib import Path

    from thresher.artifact import load_artifact, model_identity

    path = Path(model_path)
    identity = model_identity(path, path.name)
    load_artifact(artifact_dir, model=identity)
    return {"architectures": [family_of(identity.architecture).sparse_class], "thresher_artifact": str(artifact_dir),
            ATTENTION_BUDGETS_KEY: attention_budgets}


def register() -> None:
    """Entry point of `vllm.general_plugins`; vLLM calls it in every process, possibly more than once."""
    from vllm import ModelRegistry

    for family in FAMILIES.values():
        if family.sparse_class not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(family.sparse_class, f"{SPARSE_MODELS_MODULE}:{family.sparse_class}")
    from thresher.engine.runner_hooks import install_v1_hook
    from thresher.engine.selective_attention import install_kv_memory_share

    install_v1_hook()
    install_kv_memory_share()
