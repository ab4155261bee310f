"""Per-request steering inside a continuous batch.

Each distinct steering spec in the running batch owns a slot: a row of a direction table `[slots, hidden]` whose
row 0 is zeros (unsteered), and, where the artifact has an SAE, `MAX_CLAMPS` rows of clamp tables (encoder row,
bias, decoder row, value; unused rows are zeros). Before each forward, the runner hook writes every scheduled token's
slot into a per-token buffer, and the steered decoder layer adds `table[slot]` to its residual output, then each
token's clamps: every clamp row is read against every token (one small matmul), and a token keeps the rows its slot
owns. All tensors are fixed buffers updated in place, so compiled graphs and CUDA graphs read fresh values each step;
an unsteered token adds exact zeros, so its numbers are those of an unsteered run.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from thresher.engine.extras import STEERING_EXTRA_ARG
from thresher.engine.measurement import ClampMeter
from thresher.engine.runner_hooks import ScheduledBatch
from thresher.steering import MAX_CLAMPS, ClampRows, SteeringAssets, SteeringError, clamp_delta

log = logging.getLogger(__name__)


class TokenSteering:
    """The slot table of one model instance; slots are reused least-recently-used across steps."""

    def __init__(self, assets: SteeringAssets, max_tokens: int, max_specs: int, dtype: torch.dtype,
                 device: torch.device):
        self.assets = assets
        self.table = torch.zeros(max_specs + 1, assets.hidden_size, dtype=dtype, device=device)
        # float32: a clamp must move the encoder's reading to its value, not to within bf16 rounding of it
        rows = (max_specs + 1) * MAX_CLAMPS if assets.sae is not None else 0
        # explicit: vLLM builds the model under its dtype as torch's default
        clamp_zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        self.clamps = ClampRows(clamp_zeros(rows, assets.hidden_size), clamp_zeros(rows),
                                clamp_zeros(rows, assets.hidden_size), clamp_zeros(rows))
        self.clamp_slot = torch.arange(rows, device=device) // MAX_CLAMPS
        self.slots = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self._host_slots = np.zeros(max_tokens, dtype=np.int64)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # spec key -> slot, least recently used first
        self._key_of_request: dict[str, str | None] = {}  # running requests' spec keys, made once per request
        self._free = list(range(max_specs, 0, -1))

    def _spec_key(self, sampling_params) -> str | None:
        raw = (getattr(sampling_params, "extra_args", None) or {}).get(STEERING_EXTRA_ARG)
        return json.dumps(raw, sort_keys=True) if raw else None

    def _slot(self, key: str, in_use: set[int]) -> int:
        if key in self._slot_of:
            self._slot_of.move_to_end(key)
            return self._slot_of[key]
        try:
            spec = self.assets.parse(json.loads(key))
            direction = self.assets.direction(spec)
            clamps = self.assets.clamp_rows(spec) if self.assets.sae is not None else None
        except SteeringError as error:
            # The server validates specs before they reach the engine; a stray one must not kill the worker.
            log.error("%s; running the request unsteered", error)
            return 0
        if not self._free:
            evictable = next(k for k, s in self._slot_of.items() if s not in in_use)
            self._free.append(self._slot_of.pop(evictable))
        slot = self._free.pop()
        self.table[slot].copy_(direction.to(self.table.dtype), non_blocking=True)
        if clamps is not None:
            for table, rows in zip(self.clamps, clamps):
                table[slot * MAX_CLAMPS : (slot + 1) * MAX_CLAMPS].zero_()
                table[slot * MAX_CLAMPS : slot * MAX_CLAMPS + len(rows)].copy_(rows, non_blocking=True)
        self._slot_of[key] = slot
        return slot

    def update(self, sampling_params: Mapping, batch: ScheduledBatch) -> None:
        """`sampling_params[req_id]` of every running request; ids missing from it (dummy runs) run unsteered."""
        req_ids, num_scheduled_tokens = batch.req_ids, batch.num_scheduled_tokens
        in_use: set[int] = set()
        per_request = np.zeros(len(req_ids), dtype=np.int64)
        known = self._key_of_request
        self._key_of_request = {r: known[r] if r in known else self._spec_key(sampling_params.get(r))
                                for r in req_ids}
        for i, req_id in enumerate(req_ids):
            key = self._key_of_request[req_id]
            if key is not None:
                per_request[i] = self._slot(key, in_use)
                in_use.add(int(per_request[i]))
        total = int(num_scheduled_tokens.sum())
        self._host_slots[:total] = np.repeat(per_request, num_scheduled_tokens)
        self._host_slots[total:] = 0
        self.slots.copy_(torch.from_numpy(self._host_slots), non_blocking=True)


class SteeredLayer:
    """Mixed into a decoder layer's class (every supported family's returns `(hidden_states, residual)`): its
    forward, then each token's direction added to the residual stream, then its clamps.

    vLLM defers the residual add to the next layer's norm, so the stream after this layer is
    `hidden_states + residual`; adding to `residual` adds to the stream. Installed by swapping the class of the
    loaded layer for a subclass of its own (stock, or thresher's fused one), which keeps its weight names.
    """

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        hidden_states, residual = super().forward(positions, hidden_states, residual, *args, **kwargs)
        slots = self.thresher_steering_slots[: residual.shape[0]]
        residual = residual + self.thresher_steering_table[slots]
        if not self.thresher_clamps_rows:
            return hidden_states, residual
        clamps = ClampRows(self.thresher_clamp_encoder, self.thresher_clamp_bias, self.thresher_clamp_decoder,
                           self.thresher_clamp_values)
        owned = (self.thresher_clamp_slot[None, :] == slots[:, None]).float()
        stream = (hidden_states + residual).float()
        residual = residual + clamp_delta(stream, clamps, owned).to(residual.dtype)
        if self.thresher_clamp_meter.enabled:
            self.thresher_clamp_meter.add(stream, (hidden_states + residual).float(), clamps, owned)
        return hidden_states, residual


@functools.cache
def _steered(layer_class: type) -> type:
    return type(f"Steered{layer_class.__name__}", (SteeredLayer, layer_class), {})


def install_steering(layer: torch.nn.Module, steering: TokenSteering) -> None:
    layer.__class__ = _steered(type(layer))
    # the state's own tensors, updated in place by the runner hook
    layer.register_buffer("thresher_steering_table", steering.table, persistent=False)
    layer.register_buffer("thresher_steering_slots", steering.slots, persistent=False)
    layer.thresher_clamps_rows = len(steering.clamp_slot) > 0
    for name, table in zip(ClampRows._fields, steering.clamps):
        layer.register_buffer(f"thresher_clamp_{name}", table, persistent=False)
    layer.register_buffer("thresher_clamp_slot", steering.clamp_slot, persistent=False)
    layer.thresher_clamp_meter = ClampMeter(steering.table.device)
