"""Which KV-cache pages a decode query reads under an attention budget (after Quest), batched over vLLM's paged
cache, and its per-sequence reference.

A page is one of vLLM's KV blocks. Each keeps a summary of its keys, the element-wise minimum and maximum per KV
head, so that `sum_d max(q_d * min_d, q_d * max_d)` bounds q.k over the page from above. A decode query keeps its
sequence's first page (attention sinks) and its `RECENT_PAGES` newest pages, and fills the rest of its budget with
the pages of highest estimated attention mass: per query head, the softmax of the bounds over the candidate pages,
summed over the heads (one selection per KV group of the sequence, so that the platform's own paged attention reads
it as a shorter block table). `reference_selection` states the same rule on one sequence's unpaged keys; it is the
ground truth the batched, paged `select_pages` is tested against.
"""

from __future__ import annotations

import math

import torch

SINK_PAGES = 1
RECENT_PAGES = 2  # the page being written and the one before it
# The smallest budget that leaves a page to choose, in pages; a budget of 0 means dense attention.
MIN_BUDGET_PAGES = SINK_PAGES + RECENT_PAGES + 1
# The smallest budget in tokens a request may ask for: MIN_BUDGET_PAGES pages of up to 32 tokens (vLLM's blocks are
# 16 tokens on GPUs, thresher's 32 on the CPU).
MIN_BUDGET_TOKENS = 128


def summary_bytes_per_kv_byte(block_size: int) -> float:
    """The summaries' memory beside the KV cache's: two key vectors per block against the block's keys and values."""
    return 2 / (2 * block_size)


def new_summaries(num_blocks: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """`[num_blocks + 1, kv_heads, 2, head_size]`: each block's key minimum and maximum; the extra last row takes
    the writes of padding slots."""
    summaries = torch.empty(num_blocks + 1, num_kv_heads, 2, head_size, dtype=dtype, device=device)
    summaries[:, :, 0] = math.inf
    summaries[:, :, 1] = -math.inf
    return summaries


def update_summaries(summaries: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor, block_size: int) -> None:
    """Fold the keys just written to the cache (`key` `[tokens, kv_heads, head_size]` at `slot_mapping`) into their
    blocks' summaries. A write at a block's first slot starts the block afresh: that is how a reused block begins."""
    dummy = summaries.shape[0] - 1
    slots = slot_mapping[: key.shape[0]].to(torch.long)
    valid = slots >= 0
    blocks = torch.where(valid, slots // block_size, dummy)
    restarts = torch.where(valid & (slots % block_size == 0), blocks, dummy)
    summaries[:, :, 0].index_fill_(0, restarts, math.inf)
    summaries[:, :, 1].index_fill_(0, restarts, -math.inf)
    key = key.to(summaries.dtype)
    index = blocks.view(-1, 1, 1).expand_as(key)
    summaries[:, :, 0].scatter_reduce_(0, index, key, "amin")
    summaries[:, :, 1].scatter_reduce_(0, index, key, "amax")


def page_mass(query: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, candidate: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Estimated attention mass of each page, summed over query heads.

    query `[..., heads, head_size]`; minimum/maximum `[..., pages, kv_heads, head_size]`; candidate `[..., pages]`.
    The bound `sum_d max(q_d * min_d, q_d * max_d)` is taken as `q . center + |q| . radius`, two matmuls.
    """
    kv_heads = minimum.shape[-2]
    grouped = query.float().unflatten(-2, (kv_heads, -1))  # [..., kv_heads, group, head_size]
    center = (maximum.float() + minimum.float()) / 2
    radius = (maximum.float() - minimum.float()) / 2
    bound = (torch.einsum("...hgd,...phd->...phg", grouped, center)
             + torch.einsum("...hgd,...phd->...phg", grouped.abs(), radius))
    bound = bound.flatten(-2) * scale  # [..., pages, heads]
    bound = bound.masked_fill(~candidate.unsqueeze(-1), -math.inf)
    mass = torch.softmax(bound, dim=-2).nan_to_num(0.0)  # a sequence without candidates has no mass to share
    return mass.sum(-1).masked_fill(~candidate, -math.inf)


def selective(num_pages, budget_pages):
    """Which sequences select (torch tensors or numpy arrays alike): those with a budget their context exceeds; the
    others read every page of their context."""
    return (budget_pages > 0) & (num_pages > budget_pages)


def candidates(page: torch.Tensor, num_pages: torch.Tensor) -> torch.Tensor:
    """`[rows, pages]`: the pages each row may choose, past the sinks and before its newest pages."""
    return (page >= SINK_PAGES) & (page < (num_pages - RECENT_PAGES).unsqueeze(1))


def kept_pages(mass: torch.Tensor, num_pages: torch.Tensor, budget_pages: torch.Tensor) -> torch.Tensor:
    """`[rows, pages]` bool: the pages each row reads, from its pages' `page_mass` (-inf off its candidates), its
    context's pages and its budget in pages (0 or at least the context's: every page of the context)."""
    page = torch.arange(mass.shape[1], device=mass.device)
    within = page < num_pages.unsqueeze(1)
    keep = (page < SINK_PAGES) | (page >= (num_pages - RECENT_PAGES).unsqueeze(1))
    picks = (budget_pages - SINK_PAGES - RECENT_PAGES).clamp_min(0)
    most = int(picks.max())
    if most > 0:
        order = torch.topk(mass, min(most, mass.shape[1]), dim=1).indices
        chosen = torch.arange(order.shape[1], device=order.device) < picks.unsqueeze(1)
        keep = keep | torch.zeros_like(keep).scatter(1, order, chosen)
    return torch.where(selective(num_pages, budget_pages).unsqueeze(1), keep & within, within)


def reference_selection(query: torch.Tensor, keys: torch.Tensor, budget_pages: int, block_size: int,
                        scale: float) -> list[int]:
    """The pages one decode query reads: query `[heads, head_size]`, keys `[context, kv_heads, head_size]` (the
    whole context, its newest token last). All of them when the context fits in the budget."""
    num_pages = -(-keys.shape[0] // block_size)
    if budget_pages == 0 or num_pages <= budget_pages:
        return list(range(num_pages))
    pages = [keys[p * block_size : (p + 1) * block_size] for p in range(num_pages)]
    minimum = torch.stack([page.amin(0) for page in pages])
    maximum = torch.stack([page.amax(0) for page in pages])
    candidates = range(SINK_PAGES, num_pages - RECENT_PAGES)
    candidate = torch.tensor([p in candidates for p in range(num_pages)])
    mass = page_mass(query, minimum, maximum, candidate, scale)
    chosen = torch.topk(mass[SINK_PAGES : num_pages - RECENT_PAGES], budget_pages - SINK_PAGES - RECENT_PAGES)
    middle = [SINK_PAGES + int(i) for i in chosen.indices]
    return sorted([*range(SINK_PAGES), *middle, *range(num_pages - RECENT_PAGES, num_pages)])


def select_pages(query: torch.Tensor, summaries: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 budget_pages: torch.Tensor, block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Compacted block tables and sequence lengths for decode queries.

    query `[seqs, heads, head_size]` (each sequence's one decode query); block_table `[seqs, max_pages]`; seq_lens
    and budget_pages `[seqs]`. A sequence whose budget is 0 or whose context fits in it keeps its table; the others
    get their selected pages in context order (the newest, partly filled page last) and the length of that shorter
    context, so attention over the compacted table reads exactly the selected tokens.
    """
    num_pages = (seq_lens + block_size - 1) // block_size
    width = int(num_pages.max())
    page = torch.arange(width, device=block_table.device)
    blocks = block_table[:, :width].to(torch.long)
    mass = page_mass(query, summaries[blocks, :, 0], summaries[blocks, :, 1], candidates(page, num_pages), scale)
    keep = kept_pages(mass, num_pages, budget_pages)
    # kept pages first, in context order
    position = torch.where(keep, page, page + width).argsort(dim=1)
    compacted = block_table.clone()
    kept = keep.sum(1)
    compacted[:, :width] = torch.where(page < kept.unsqueeze(1), torch.gather(blocks, 1, position),
                                       blocks).to(block_table.dtype)
    last_fill = seq_lens - (num_pages - 1) * block_size
    lengths = torch.where(selective(num_pages, budget_pages), (kept - 1) * block_size + last_fill, seq_lens)
    return compacted, lengths.to(seq_lens.dtype)
