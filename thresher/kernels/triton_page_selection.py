"""Page selection for decode attention on GPUs, in Triton: the same rule as `page_selection` (its torch reference,
which the CPU engine runs), with no host synchronisation, so that a decode step with budgets runs inside vLLM's full
CUDA graphs. One launch in the KV cache write, three in the forward:

1. `_fold_summaries` (in the KV cache write): each run of consecutive slots of one block among the keys just written
   is folded by one program into that block's minimum and maximum; a run that starts at the block's first slot
   starts the block afresh (a reused block). No atomics: vLLM writes the tokens of a block contiguously.
2. `_page_bounds`: per (sequence, tile of pages, KV head), the scaled upper bound of q.k for the group's query heads
   over the candidate pages (`-inf` elsewhere), on the tensor cores, and the tile's per-head maximum and sum of
   exponentials.
3. `_page_mass`: per (sequence, tile), each head's softmax statistics over all tiles, then each page's per-head
   softmax summed over heads (its estimated attention mass).
4. `_select`: per sequence, the pages of the `picks` largest masses (ties taken in page order), found by a radix
   select over the masses' fp32 bit patterns, `SELECT_RADIX` bits per pass (once a pass leaves every mass sharing
   the threshold's leading bits taken, the later ones skip their sweeps), written compacted, in context order, with
   the length of the shorter context. A sequence without a budget, or whose context fits in it, gets its own
   table's pages and its length (and steps 2 and 3 do nothing for it).

On Hopper and newer every launch uses programmatic dependent launch, as the sparse kernels do (`triton_sparse`): in
a step without budgets the launches have nothing to do, and what they cost is mostly the launch gap it hides.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from thresher.kernels.page_selection import RECENT_PAGES, SINK_PAGES
from thresher.kernels.triton_sparse import wait_for_previous_kernel, supports_pdl

PAGE_TILE = 64  # pages per `_page_bounds` program (one KV head each)
SELECT_CHUNK = 2048  # pages per step of `_select`'s passes over a context
SELECT_RADIX = 8  # bits of the masses' patterns per pass of `_select`


@triton.jit
def _fold_summaries(key_ptr, slot_ptr, summaries_ptr, tokens, key_token_stride, key_head_stride, block_size,
                    KV_HEADS: tl.constexpr, KV_BLOCK: tl.constexpr, HEAD: tl.constexpr, RUN: tl.constexpr,
                    USE_GDC: tl.constexpr):
    wait_for_previous_kernel(USE_GDC)
    t = tl.program_id(0).to(tl.int64)
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
    assert key.shape[2] == triton.next_power_of_2(key.shape[2]), f"head size {key.shape[2]}: a power of two only"
    pdl = supports_pdl(key.device)
    _fold_summaries[(tokens,)](key, slot_mapping, summaries, tokens, key.stride(0), key.stride(1), block_size,
                               KV_HEADS=key.shape[1], KV_BLOCK=triton.next_power_of_2(key.shape[1]),
                               HEAD=key.shape[2], RUN=block_size, USE_GDC=pdl, launch_pdl=pdl, num_warps=4)


@triton.jit
def _page_bounds(query_ptr, query_start_ptr, query_token_stride, summaries_ptr, table_ptr, table_stride,
                 seq_lens_ptr, budget_ptr, bounds_ptr, tile_max_ptr, tile_sum_ptr, width, tiles, block_size, scale,
                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                 HEAD: tl.constexpr, TILE: tl.constexpr, SINKS: tl.constexpr, RECENT: tl.constexpr,
                 NATIVE_DOT: tl.constexpr, USE_GDC: tl.constexpr):
    wait_for_previous_kernel(USE_GDC)
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_pages = (seq_len + block_size - 1) // block_size
    budget = tl.load(budget_ptr + seq)
    selective = (budget > 0) & (num_pages > budget)
    # nothing to do for the tiles past the context, nor for the other sequences (`_select` copies their tables)
    if selective & (tile * TILE < num_pages):
        pages = tile * TILE + tl.arange(0, TILE)
        candidate = (pages >= SINKS) & (pages < num_pages - RECENT)
        blocks = tl.load(table_ptr + seq * table_stride + pages, mask=candidate, other=0).to(tl.int64)
        row = tl.load(query_start_ptr + seq).to(tl.int64)
        group = tl.arange(0, GROUP_BLOCK)
        in_group = group < GROUP
        dims = tl.arange(0, HEAD)
        heads = kv_head * GROUP + group
        q = tl.load(query_ptr + row * query_token_stride + heads[:, None] * HEAD + dims[None, :],
                    mask=in_group[:, None], other=0.0)  # [GROUP_BLOCK, HEAD]
        summary = summaries_ptr + blocks[:, None] * (KV_HEADS * 2 * HEAD) + kv_head * 2 * HEAD + dims[None, :]
        low = tl.load(summary, mask=candidate[:, None], other=0.0)  # [TILE, HEAD]
        high = tl.load(summary + HEAD, mask=candidate[:, None], other=0.0)
        # sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min: two products on the tensor cores, exact in half
        # precision (every product of two half-precision values is an fp32 value)
        positive = tl.maximum(q, 0.0).to(high.dtype)
        negative = tl.minimum(q, 0.0).to(low.dtype)
        if NATIVE_DOT:
            bound = tl.dot(positive, tl.trans(high)) + tl.dot(negative, tl.trans(low))
        else:  # the CPU interpreter (numpy has no bfloat16) and fp32 summaries: fp32 products
            bound = (tl.dot(positive.to(tl.float32), tl.trans(high.to(tl.float32)), input_precision="ieee")
                     + tl.dot(negative.to(tl.float32), tl.trans(low.to(tl.float32)), input_precision="ieee"))
        bound = tl.where(candidate[None, :], bound * scale, float("-inf"))  # [GROUP_BLOCK, TILE]
        tl.store(bounds_ptr + (seq * HEADS + heads[:, None]) * width + pages[None, :], bound,
                 mask=in_group[:, None] & (pages[None, :] < width))
        top = tl.max(bound, axis=1)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp(bound - safe_top[:, None]), axis=1)
        tl.store(tile_max_ptr + (seq * HEADS + heads) * tiles + tile, top, mask=in_group)
        tl.store(tile_sum_ptr + (seq * HEADS + heads) * tiles + tile, total, mask=in_group)


@triton.jit
def _page_mass(bounds_ptr, tile_max_ptr, tile_sum_ptr, mass_ptr, seq_lens_ptr, budget_ptr, width, tiles, block_size,
               HEADS: tl.constexpr, HEADS_BLOCK: tl.constexpr, TILES: tl.constexpr, TILE: tl.constexpr,
               SINKS: tl.constexpr, RECENT: tl.constexpr, USE_GDC: tl.constexpr):
    """Per (sequence, tile): each head's softmax maximum and sum of exponentials over all tiles (every program of the
    sequence computes them again: a few thousand loads, against a launch of their own), then each candidate page's
    softmax mass summed over heads, as its fp32 bit pattern (masses are >= 0, so the patterns order as the masses
    do); -1 for the other pages, below every mass."""
    wait_for_previous_kernel(USE_GDC)
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    num_pages = (tl.load(seq_lens_ptr + seq) + block_size - 1) // block_size
    budget = tl.load(budget_ptr + seq)
    if (budget > 0) & (num_pages > budget) & (tile * TILE < num_pages):  # as in `_page_bounds`
        heads = tl.arange(0, HEADS_BLOCK)
        real = heads < HEADS
        tile_index = tl.arange(0, TILES)
        used = real[:, None] & (tile_index < (num_pages + TILE - 1) // TILE)[None, :]
        stats = (seq * HEADS + heads[:, None]) * tiles + tile_index[None, :]
        tile_max = tl.load(tile_max_ptr + stats, mask=used, other=float("-inf"))
        top = tl.where(real, tl.max(tile_max, axis=1), 0.0)
        total = tl.sum(tl.load(tile_sum_ptr + stats, mask=used, other=0.0) * tl.exp(tile_max - top[:, None]), axis=1)
        total = tl.where(real, total, 1.0)
        pages = tile * TILE + tl.arange(0, TILE)
        candidate = (pages >= SINKS) & (pages < num_pages - RECENT)
        bound = tl.load(bounds_ptr + (seq * HEADS + heads[:, None]) * width + pages[None, :],
                        mask=real[:, None] & candidate[None, :], other=float("-inf"))
        mass = tl.sum(tl.exp(bound - top[:, None]) / total[:, None], axis=0)
        tl.store(mass_ptr + seq * width + pages, tl.where(candidate, mass.to(tl.int32, bitcast=True), -1),
                 mask=pages < num_pages)


@triton.jit
def _select(mass_ptr, table_ptr, table_stride, out_ptr, out_stride, seq_lens_ptr, budget_ptr, lengths_ptr, width,
            block_size, CHUNK: tl.constexpr, RADIX: tl.constexpr, SINKS: tl.constexpr, RECENT: tl.constexpr,
            USE_GDC: tl.constexpr):
    wait_for_previous_kernel(USE_GDC)
    seq = tl.program_id(0).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_pages = (seq_len + block_size - 1) // block_size
    budget = tl.load(budget_ptr + seq)
    table = table_ptr + seq * table_stride
    out = out_ptr + seq * out_stride
    offsets = tl.arange(0, CHUNK)
    kept = tl.full((), 0, tl.int32)  # the table's first `kept` entries are the selected pages
    length = seq_len
    if (budget > 0) & (num_pages > budget):  # as in `_page_bounds`
        masses = mass_ptr + seq * width
        # the `picks`-th largest mass, RADIX bits of its bit pattern per pass from the top (bit 31, the sign, is 0);
        # `needed` ends as how many masses equal to it to take, in page order. Once the masses that share the
        # threshold's bits so far are all taken, the later passes skip their sweeps: the threshold keeps those bits
        # (the rest 0) and `needed` their count, no fewer than the masses equal to it.
        needed = budget - SINKS - RECENT
        threshold = tl.full((), 0, tl.int32)
        settled = needed <= 0
        digits = tl.arange(0, 1 << RADIX)
        for step in range((31 + RADIX - 1) // RADIX):
            top = 31 - step * RADIX  # this pass's digit is bits [shift, top) of the pattern
            shift = tl.maximum(top - RADIX, 0)
            counts = tl.zeros((1 << RADIX,), tl.int32)
            for start in range(0, tl.where(settled, 0, num_pages), CHUNK):
                pages = start + offsets
                bits = tl.load(masses + pages, mask=pages < num_pages, other=-1)
                match = (bits >= 0) & ((bits >> top) == (threshold >> top))  # every candidate in the first pass
                counts += tl.histogram(tl.where(match, (bits >> shift) & ((1 << (top - shift)) - 1), 0), 1 << RADIX)
                counts -= tl.where(digits == 0, CHUNK - tl.sum(match.to(tl.int32), axis=0), 0)
            at_least = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # matches with digit >= d
            digit = tl.max(tl.where(at_least >= needed, digits, -1), axis=0)
            left = needed - tl.sum(tl.where(digits == digit, at_least - counts, 0), axis=0)
            threshold = tl.where(settled, threshold, threshold | (digit << shift))
            # all of the digit's masses taken: those equal to the threshold (its lower bits 0) are among them
            settled_now = left == tl.sum(tl.where(digits == digit, counts, 0), axis=0)
            needed = tl.where(settled, needed, left)
            settled = settled | settled_now
        # a budget of no more pages than the sinks and the newest: no pass swept, and a threshold over every mass
        # takes none
        threshold = tl.where(budget > SINKS + RECENT, threshold, 0x7FFFFFFF)
        needed = tl.maximum(needed, 0)
        # the sinks, the chosen pages and the newest pages, compacted in context order
        ties_before = tl.full((), 0, tl.int32)
        for start in range(0, num_pages, CHUNK):
            pages = start + offsets
            bits = tl.load(masses + pages, mask=pages < num_pages, other=-1)
            ties = bits == threshold
            chosen = (bits > threshold) | (ties & (ties_before + tl.cumsum(ties.to(tl.int32), axis=0) <= needed))
            keep = (pages < SINKS) | ((pages >= num_pages - RECENT) & (pages < num_pages)) | chosen
            blocks = tl.load(table + pages, mask=keep)
            tl.store(out + kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1, blocks, mask=keep)
            kept += tl.sum(keep.to(tl.int32), axis=0)
            ties_before += tl.sum(ties.to(tl.int32), axis=0)
        length = (kept - 1) * block_size + seq_len - (num_pages - 1) * block_size
    # the rest of the pages the attention reads (all of them without a selection); entries past the context are
    # never read, and copying the table's whole width would make every idle sequence's cost grow with the model length
    for start in range(kept, num_pages, CHUNK):
        pages = start + offsets
        tl.store(out + pages, tl.load(table + pages, mask=pages < num_pages), mask=pages < num_pages)
    tl.store(lengths_ptr + seq, length)


def _scratch_shapes(seqs: int, heads: int, width: int) -> list[tuple[int, ...]]:
    """The temporaries of one `select_pages` call, 4-byte elements: each head's page bounds, tile maxima and sums,
    and the pages' masses."""
    tiles = triton.cdiv(width, PAGE_TILE)
    return [(seqs, heads, width), (seqs, heads, tiles), (seqs, heads, tiles), (seqs, width)]


def scratch_bytes(seqs: int, heads: int, width: int) -> int:
    """The temporary memory of one `select_pages` call (the tables and lengths it returns are the size of vLLM's)."""
    return 4 * sum(math.prod(shape) for shape in _scratch_shapes(seqs, heads, width))


def select_pages(query: torch.Tensor, query_start_loc: torch.Tensor, summaries: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, budget_pages: torch.Tensor, block_size: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`page_selection.select_pages` on a GPU, for sequences whose decode query is row `query_start_loc[i]` of
    `query` `[tokens, heads, head_size]`; every size is fixed by the shapes, so the launches can be captured. The
    returned tables hold the pages each sequence's attention reads, up to its context's page count; their entries
    past it are unset (the reference copies them)."""
    seqs, width = block_table.shape
    heads, head = query.shape[1], query.shape[2]
    kv_heads = summaries.shape[1]
    assert query.stride(1) == head and query.stride(2) == 1 and summaries.is_contiguous()
    assert head == triton.next_power_of_2(head), f"head size {head}: a power of two only"
    tiles = triton.cdiv(width, PAGE_TILE)
    device = query.device
    shapes = _scratch_shapes(seqs, heads, width)
    scratch = torch.empty(scratch_bytes(seqs, heads, width) // 4, dtype=torch.float32, device=device)
    bounds, tile_max, tile_sum, mass = (
        part.view(shape) for part, shape in zip(scratch.split([math.prod(s) for s in shapes]), shapes))
    mass = mass.view(torch.int32)
    compacted = torch.empty_like(block_table)
    lengths = torch.empty_like(seq_lens)
    if seqs == 0:
        return compacted, lengths
    native_dot = device.type == "cuda" and summaries.dtype != torch.float32
    pdl = supports_pdl(device)
    _page_bounds[(seqs, tiles, kv_heads)](
        query, query_start_loc, query.stride(0), summaries, block_table, block_table.stride(0), seq_lens,
        budget_pages, bounds, tile_max, tile_sum, width, tiles, block_size, scale, HEADS=heads, KV_HEADS=kv_heads,
        GROUP=heads // kv_heads, GROUP_BLOCK=max(16, triton.next_power_of_2(heads // kv_heads)), HEAD=head,
        TILE=PAGE_TILE, SINKS=SINK_PAGES, RECENT=RECENT_PAGES, NATIVE_DOT=native_dot, USE_GDC=pdl, launch_pdl=pdl,
        num_warps=4)
    _page_mass[(seqs, tiles)](bounds, tile_max, tile_sum, mass, seq_lens, budget_pages, width, tiles, block_size,
                              HEADS=heads, HEADS_BLOCK=triton.next_power_of_2(heads),
                              TILES=triton.next_power_of_2(tiles), TILE=PAGE_TILE, SINKS=SINK_PAGES,
                              RECENT=RECENT_PAGES, USE_GDC=pdl, launch_pdl=pdl, num_warps=4)
    _select[(seqs,)](mass, block_table, block_table.stride(0), compacted, compacted.stride(0), seq_lens,
                     budget_pages, lengths, width, block_size, CHUNK=SELECT_CHUNK, RADIX=SELECT_RADIX, SINKS=SINK_PAGES,
                     RECENT=RECENT_PAGES, USE_GDC=pdl, launch_pdl=pdl, num_warps=8)
    return compacted, lengths
