"""Per-token sparsity levels for the batch the model is about to run.

vLLM's model forward sees only token ids and positions, not requests. Before each forward, the model runner hook
(`runner_hooks`) writes the level index of every scheduled token into a buffer the model owns: the request's level
for decode tokens, 0 (dense) for prompt tokens, which are compute-bound. The buffer is a fixed tensor updated in
place, so compiled graphs read fresh values every step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from thresher.artifact import ArtifactError, level_index
from thresher.engine.extras import SPARSITY_EXTRA_ARG
from thresher.engine.runner_hooks import ScheduledBatch

log = logging.getLogger(__name__)


class TokenLevels:
    """The level buffer of one model instance and the mapping from a request's sparsity to a level index."""

    def __init__(self, levels: list[float], max_tokens: int, device: torch.device):
        self.levels = levels
        self.buffer = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self._host = np.zeros(max_tokens, dtype=np.int64)

    def level_index(self, sampling_params) -> int:
        extra = getattr(sampling_params, "extra_args", None) or {}
        try:
            return level_index(self.levels, float(extra.get(SPARSITY_EXTRA_ARG, 0.0) or 0.0))
        except ArtifactError as error:
            # The server validates levels before a request reaches the engine; a stray one must not kill the worker.
            log.error("%s; running the request dense", error)
            return 0

    def update(self, sampling_params: Mapping, batch: ScheduledBatch) -> None:
        """`sampling_params[req_id]` of every running request; ids missing from it (dummy runs) run dense."""
        num_scheduled_tokens = batch.num_scheduled_tokens
        per_request = np.array(
            [self.level_index(sampling_params.get(r)) if d and n == 1 else 0
             for r, n, d in zip(batch.req_ids, num_scheduled_tokens, batch.decoding)],
            dtype=np.int64,
        )
        total = int(num_scheduled_tokens.sum())
        self._host[:total] = np.repeat(per_request, num_scheduled_tokens)
        self._host[total:] = 0
        self.buffer.copy_(torch.from_numpy(self._host), non_blocking=True)
