"""Page selection for decode attention on GPUs, in Triton: the same rule as `page_selection` (its torch reference,
which the CPU engine runs), in three launches per layer with no host synchronisation, so that a decode step with
budgets runs inside vLLM's full CUDA graphs.

1. `_fold_summaries` (in the KV cache write): each run of consecutive slots of one block among the keys just written
   is folded by one program into that block's minimum and maximum; a run that starts at the block's first slot
   starts the block afresh (a reused block). No atomics: vLLM writes the tokens of a block contiguously.
2. `_page_bounds`: per (sequence, tile of pages), the scaled upper bound of q.k for every query head over the
   candidate pages (`-inf` elsewhere), and the tile's per-head maximum and sum of exponentials.
3. `_select`: per sequence, the per-head softmax of the bounds from the tiles' statistics, summed over heads (the
   page's estimated attention mass); the pages to pick are those above the mass that a bisection over its fp32 bit
   patterns finds to leave exactly the budget (ties taken in page order); the kept pages are written compacted, in
   context order, with the length of the shorter context. A sequence without a budget, or whose context fits in
   it, gets its own table and length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from thresher.kernels.page_selection import RECENT_PAGES, SINK_PAGES

PAGE_TILE = 16  # pages per `_page_bounds` program


@triton.jit
def _fold_summaries(key_ptr, slot_ptr, summaries_ptr, tokens, key_token_stride, key_head_stride, block_size,
                    KV_HEADS: tl.constexpr, KV_BLOCK: tl.constexpr, HEAD: tl.constexpr, RUN: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    previous = tl.load(slot_ptr + t - 1, mask=t > 0, other=-1).to(tl.int64)
    block = slot // block_size
    # the first token of its block's run among these keys; every other token of the run is folded by that program
    starts_run = (slot >= 0) & ((previous < 0) | (previous // block_size != block))
    if starts_run:
        heads = tl.arange(0, KV_BLOCK)
        dims = tl.arange(0, HEAD)
        offsets = heads[:, None] * key_head_stride + dims[None, :]
        real = (heads < KV_HEADS)[:, None]
        low = tl.load(key_ptr + t * key_token_stride + offsets, mask=real, other=0.0).to(tl.float32)
        high = low
        for i in range(1, RUN):
            later = tl.load(slot_ptr + t + i, mask=t + i < tokens, other=-1).to(tl.int64)
            same = (later == slot + i) & (slot % block_size + i < block_size)
            present = (heads < tl.where(same, KV_HEADS, 0))[:, None]
            k = tl.load(key_ptr + (t + i) * key_token_stride + offsets, mask=present, other=0.0).to(tl.float32)
            low = tl.where(present, tl.minimum(low, k), low)
            high = tl.where(present, tl.maximum(high, k), high)
        summary = summaries_ptr + block * (KV_HEADS * 2 * HEAD) + heads[:, None] * (2 * HEAD) + dims[None, :]
        if slot % block_size != 0:  # the block goes on: fold in what it already holds
            low = tl.minimum(low, tl.load(summary, mask=real, other=0.0).to(tl.float32))
            high = tl.maximum(high, tl.load(summary + HEAD, mask=real, other=0.0).to(tl.float32))
        tl.store(summary, low.to(summaries_ptr.dtype.element_ty), mask=real)
        tl.store(summary + HEAD, high.to(summaries_ptr.dtype.element_ty), mask=real)


def fold_summaries(summaries: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor, block_size: int) -> None:
    """`page_selection.update_summaries` on a GPU: fold `key` `[tokens, kv_heads, head_size]` written at
    `slot_mapping` into `summaries` `[blocks + 1, kv_heads, 2, head_size]`."""
    tokens = min(key.shape[0], slot_mapping.shape[0])  # vLLM pads the keys of a batch, not its slots
    if tokens == 0:
        return
    assert key.stride(2) == 1 and summaries.is_contiguous()
    _fold_summaries[(tokens,)](key, slot_mapping, summaries, tokens, key.stride(0), key.stride(1), block_size,
                               KV_HEADS=key.shape[1], KV_BLOCK=triton.next_power_of_2(key.shape[1]),
                               HEAD=key.shape[2], RUN=block_size, num_warps=4)


@triton.jit
def _page_bounds(query_ptr, query_start_ptr, query_token_stride, summaries_ptr, table_ptr, table_stride,
                 seq_lens_ptr, budget_ptr, bounds_ptr, tile_max_ptr, tile_sum_ptr, width, tiles, block_size, scale,
                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                 HEAD: tl.constexpr, TILE: tl.constexpr, SINKS: tl.constexpr, RECENT: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_pages = (seq_len + block_size - 1) // block_size
    budget = tl.load(budget_ptr + seq)
    pages = tile * TILE + tl.arange(0, TILE)
    selective = (budget > 0) & (num_pages > budget)
    # nothing to do for the tiles past the context, nor for the other sequences (`_select` copies their tables)
    if selective & (tile * TILE < num_pages):
        candidate = (pages >= SINKS) & (pages < num_pages - RECENT)
        blocks = tl.load(table_ptr + seq * table_stride + pages, mask=candidate, other=0).to(tl.int64)
        row = tl.load(query_start_ptr + seq).to(tl.int64)
        group = tl.arange(0, GROUP_BLOCK)
        in_group = group < GROUP
        dims = tl.arange(0, HEAD)
        for kv_head in range(KV_HEADS):
            heads = kv_head * GROUP + group
            q = tl.load(query_ptr + row * query_token_stride + heads[:, None] * HEAD + dims[None, :],
                        mask=in_group[:, None], other=0.0).to(tl.float32)  # [GROUP_BLOCK, HEAD]
            summary = summaries_ptr + blocks[:, None] * (KV_HEADS * 2 * HEAD) + kv_head * 2 * HEAD + dims[None, :]
            low = tl.load(summary, mask=candidate[:, None], other=0.0).to(tl.float32)  # [TILE, HEAD]
            high = tl.load(summary + HEAD, mask=candidate[:, None], other=0.0).to(tl.float32)
            center = (high + low) / 2
            radius = (high - low) / 2
            bound = tl.sum(q[:, None, :] * center[None, :, :] + tl.abs(q)[:, None, :] * radius[None, :, :], axis=2)
            bound = tl.where(candidate[None, :], bound * scale, float("-inf"))  # [GROUP, TILE]
            tl.store(bounds_ptr + (seq * HEADS + heads[:, None]) * width + pages[None, :], bound,
                     mask=in_group[:, None] & (pages[None, :] < width))
            top = tl.max(bound, axis=1)
            safe_top = tl.where(top == float("-inf"), 0.0, top)
            total = tl.sum(tl.exp(bound - safe_top[:, None]), axis=1)
            tl.store(tile_max_ptr + (seq * HEADS + heads) * tiles + tile, top, mask=in_group)
            tl.store(tile_sum_ptr + (seq * HEADS + heads) * tiles + tile, total, mask=in_group)


@triton.jit
def _select(bounds_ptr, tile_max_ptr, tile_sum_ptr, table_ptr, table_stride, out_ptr, out_stride, seq_lens_ptr,
            budget_ptr, lengths_ptr, width, tiles, block_size,
            HEADS: tl.constexpr, PAGES: tl.constexpr, TILES: tl.constexpr, TILE: tl.constexpr, SINKS: tl.constexpr,
            RECENT: tl.constexpr):
    seq = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_pages = (seq_len + block_size - 1) // block_size
    budget = tl.load(budget_ptr + seq)
    pages = tl.arange(0, PAGES)
    in_table = pages < width
    blocks = tl.load(table_ptr + seq * table_stride + pages, mask=in_table, other=0)
    if (budget > 0) & (num_pages > budget):  # as in `_page_bounds`
        candidate = (pages >= SINKS) & (pages < num_pages - RECENT)
        tile_index = tl.arange(0, TILES)
        used = tile_index < (num_pages + TILE - 1) // TILE  # the tiles `_page_bounds` wrote
        mass = tl.zeros((PAGES,), dtype=tl.float32)
        for head in range(HEADS):
            stats = (seq * HEADS + head) * tiles + tile_index
            tile_max = tl.load(tile_max_ptr + stats, mask=used, other=float("-inf"))
            top = tl.max(tile_max, axis=0)
            total = tl.sum(tl.load(tile_sum_ptr + stats, mask=used, other=0.0) * tl.exp(tile_max - top), axis=0)
            bound = tl.load(bounds_ptr + (seq * HEADS + head) * width + pages, mask=candidate, other=float("-inf"))
            mass += tl.exp(bound - top) / total
        # masses are >= 0, so their bit patterns order as they do; the non-candidates sit below every one
        bits = tl.where(candidate, mass.to(tl.int32, bitcast=True), -1)
        picks = budget - SINKS - RECENT
        low = tl.full((), 0, tl.int32)
        high = tl.full((), 0x7F800001, tl.int32)
        for _ in range(31):  # the largest threshold that at least `picks` masses reach
            middle = low + (high - low) // 2
            enough = tl.sum((bits >= middle).to(tl.int32), axis=0) >= picks
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle)
        above = bits > low
        ties = bits == low
        tie_rank = tl.cumsum(ties.to(tl.int32), axis=0)
        chosen = above | (ties & (tie_rank <= picks - tl.sum(above.to(tl.int32), axis=0)))
        keep = (pages < SINKS) | ((pages >= num_pages - RECENT) & (pages < num_pages)) | chosen
        position = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + seq * out_stride + position, blocks, mask=keep)
        kept = tl.sum(keep.to(tl.int32), axis=0)
        tl.store(out_ptr + seq * out_stride + pages, blocks, mask=in_table & (pages >= kept))
        last_fill = seq_len - (num_pages - 1) * block_size
        tl.store(lengths_ptr + seq, (kept - 1) * block_size + last_fill)
    else:
        tl.store(out_ptr + seq * out_stride + pages, blocks, mask=in_table)
        tl.store(lengths_ptr + seq, seq_len)


def select_pages(query: torch.Tensor, query_start_loc: torch.Tensor, summaries: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, budget_pages: torch.Tensor, block_size: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`page_selection.select_pages` on a GPU, for sequences whose decode query is row `query_start_loc[i]` of
    `query` `[tokens, heads, head_size]`; every size is fixed by the shapes, so the launches can be captured."""
    seqs, width = block_table.shape
    heads, head = query.shape[1], query.shape[2]
    kv_heads = summaries.shape[1]
    assert query.stride(1) == head and query.stride(2) == 1 and summaries.is_contiguous()
    tiles = triton.cdiv(width, PAGE_TILE)
    bounds = torch.empty(seqs, heads, width, dtype=torch.float32, device=query.device)
    tile_max = torch.empty(seqs, heads, tiles, dtype=torch.float32, device=query.device)
    tile_sum = torch.empty_like(tile_max)
    compacted = torch.empty_like(block_table)
    lengths = torch.empty_like(seq_lens)
    if seqs == 0:
        return compacted, lengths
    _page_bounds[(seqs, tiles)](query, query_start_loc, query.stride(0), summaries, block_table,
                                block_table.stride(0), seq_lens, budget_pages, bounds, tile_max, tile_sum, width,
                                tiles, block_size, scale, HEADS=heads, KV_HEADS=kv_heads, GROUP=heads // kv_heads,
                                GROUP_BLOCK=triton.next_power_of_2(heads // kv_heads), HEAD=head, TILE=PAGE_TILE,
                                SINKS=SINK_PAGES, RECENT=RECENT_PAGES, num_warps=4)
    pages = triton.next_power_of_2(width)
    _select[(seqs,)](bounds, tile_max, tile_sum, block_table, block_table.stride(0), compacted, compacted.stride(0),
                     seq_lens, budget_pages, lengths, width, tiles, block_size, HEADS=heads, PAGES=pages,
                     TILES=triton.next_power_of_2(tiles), TILE=PAGE_TILE, SINKS=SINK_PAGES, RECENT=RECENT_PAGES,
                     num_warps=8 if pages >= 2048 else 4)
    return compacted, lengths
