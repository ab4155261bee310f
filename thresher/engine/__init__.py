"""thresher's vLLM plugin: sparse model classes for each supported family, per-request sparsity levels and steering.

- `plugin`: registration (the `vllm.general_plugins` entry point) and `engine_overrides`, which select the sparse
  class for a model and its artifact;
- `extras`: what a request carries into vLLM (`request_extras`: extra args and prefix-cache salt);
- `sparse_models`: the sparse model classes and their thresholded or fused projections;
- `token_levels`, `token_steering`, `runner_hooks`: per-token state, fed by vLLM's model runners before each forward;
- `measurement`: opt-in measurement tools (decode sparsity, in-engine recording of projection inputs).
"""

from thresher.engine.extras import SPARSITY_EXTRA_ARG, STEERING_EXTRA_ARG, request_extras
from thresher.engine.plugin import engine_overrides, register

__all__ = ["SPARSITY_EXTRA_ARG", "STEERING_EXTRA_ARG", "engine_overrides", "register", "request_extras"]
