"""What a request carries into vLLM for thresher: its `SamplingParams.extra_args` keys and its prefix-cache salt.

The server builds them with `request_extras`; the engine's per-token states read them back (`token_levels`,
`token_steering`). These three keys are the whole wire format between the two.
"""

from __future__ import annotations

# a request's sparsity level (a calibrated fraction; absent or 0.0 = dense)
SPARSITY_EXTRA_ARG = "thresher_sparsity"
# a request's validated steering spec, as a plain dict
STEERING_EXTRA_ARG = "thresher_steering"
# a request's attention budget: KV-cache tokens a decode step reads (absent or 0 = dense attention)
ATTENTION_EXTRA_ARG = "thresher_attention_budget"


def request_extras(sparsity: float, steering=None, attention_budget: int = 0) -> tuple[dict, str | None]:
    """A request's `SamplingParams.extra_args` and prompt `cache_salt` for a sparsity level, a steering spec and an
    attention budget.

    The salt keeps the prefix cache from serving KV computed under one steering spec to a request with another
    (or none); sparsity and attention budgets need none, since prefill runs dense at every level and budget.
    """
    extra_args = {SPARSITY_EXTRA_ARG: sparsity}
    if attention_budget:
        extra_args[ATTENTION_EXTRA_ARG] = attention_budget
    if steering is None or steering.is_empty():
        return extra_args, None
    extra_args[STEERING_EXTRA_ARG] = steering.model_dump()
    return extra_args, steering.cache_key()
