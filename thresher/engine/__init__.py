"""thresher's vLLM plugin: sparse Llama-family model classes, per-request sparsity levels and steering.

The plugin is registered through the `vllm.general_plugins` entry point, so it reaches vLLM's worker processes.
A model is served sparse by selecting the architecture through `hf_overrides` (see `engine_overrides`).
"""

from thresher.engine.plugin import SPARSITY_EXTRA_ARG, engine_overrides, register, request_extras

__all__ = ["SPARSITY_EXTRA_ARG", "engine_overrides", "register", "request_extras"]
