"""Page selection over a paged KV cache against its per-sequence reference: the torch version the CPU engine runs,
and the Triton kernels GPUs run (on the CPU through TRITON_INTERPRET=1, `tests/conftest.py`)."""

import pytest
import torch

from thresher.kernels import page_selection, triton_page_selection
from thresher.kernels.page_selection import (MIN_BUDGET_PAGES, RECENT_PAGES, SINK_PAGES, new_summaries,
                                             reference_selection, summary_bytes_per_kv_byte)

BLOCK, KV_HEADS, HEADS, HEAD = 16, 2, 6, 32
SCALE = HEAD**-0.5


def _torch_select(query, summaries, table, seq_lens, budgets):
    return page_selection.select_pages(query, summaries, table, seq_lens, budgets, BLOCK, SCALE)


def _triton_select(query, summaries, table, seq_lens, budgets):
    """The kernels read each sequence's decode query at its row of a batch's queries, here one row per sequence."""
    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return triton_page_selection.select_pages(query.contiguous(), starts, summaries.contiguous(), table,
                                              seq_lens.to(torch.int32), budgets.to(torch.int32), BLOCK, SCALE)


SELECTIONS = {"torch": _torch_select, "triton": _triton_select}
UPDATES = {"torch": page_selection.update_summaries, "triton": triton_page_selection.fold_summaries}


def _paged(lengths, num_blocks=256, seed=0, update=page_selection.update_summaries):
    """Keys of several sequences written into a shared paged cache in a scrambled block order, in chunks as
    prefill and decode write them. Returns the per-sequence keys, the block table and the summaries."""
    generator = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, KV_HEADS, HEAD, generator=generator) * torch.linspace(0.2, 3, HEAD) for n in lengths]
    free = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(-(-n // BLOCK) for n in lengths)
    table = torch.zeros(len(lengths), width + 3, dtype=torch.int32)
    for row, n in enumerate(lengths):
        for page in range(-(-n // BLOCK)):
            table[row, page] = free.pop()
    summaries = new_summaries(num_blocks, KV_HEADS, HEAD, torch.float32, torch.device("cpu"))
    for row, sequence in enumerate(keys):
        position = 0
        while position < len(sequence):
            chunk = min(int(torch.randint(1, 40, (1,), generator=generator)), len(sequence) - position)
            written = torch.arange(position, position + chunk)
            slots = table[row, written // BLOCK].long() * BLOCK + written % BLOCK
            # a padding slot (-1) rides along, as in vLLM's padded batches
            update(summaries, torch.cat([sequence[written], torch.randn(1, KV_HEADS, HEAD) * 100]),
                   torch.cat([slots, torch.tensor([-1])]), BLOCK)
            position += chunk
    return keys, table, summaries


@pytest.mark.parametrize("implementation", SELECTIONS)
def test_batched_selection_matches_the_reference_per_sequence(implementation):
    lengths = [700, 45, 1000, 333, 17 * BLOCK]
    budgets = torch.tensor([8, 8, 20, 0, MIN_BUDGET_PAGES])
    keys, table, summaries = _paged(lengths)
    query = torch.randn(len(lengths), HEADS, HEAD, generator=torch.Generator().manual_seed(1)) * 2
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    compacted, new_lengths = SELECTIONS[implementation](query, summaries, table, seq_lens, budgets)
    for row, n in enumerate(lengths):
        pages = reference_selection(query[row], keys[row], int(budgets[row]), BLOCK, SCALE)
        num_pages = -(-n // BLOCK)
        if int(budgets[row]) in (0,) or num_pages <= int(budgets[row]):
            assert pages == list(range(num_pages)) and int(new_lengths[row]) == n
            assert torch.equal(compacted[row, :num_pages], table[row, :num_pages])
            continue
        assert len(pages) == int(budgets[row]) and pages[:SINK_PAGES] == list(range(SINK_PAGES))
        assert pages[-RECENT_PAGES:] == list(range(num_pages - RECENT_PAGES, num_pages))
        assert compacted[row, : len(pages)].tolist() == table[row, pages].tolist()
        assert int(new_lengths[row]) == (len(pages) - 1) * BLOCK + n - (num_pages - 1) * BLOCK


@pytest.mark.parametrize("implementation", SELECTIONS)
def test_the_selection_follows_where_the_query_looks(implementation):
    """Among 100 pages of noise, the page whose keys share the query's direction is read."""
    direction = torch.nn.functional.normalize(torch.randn(KV_HEADS, HEAD), dim=-1)
    target, length = 57, 1600
    keys, table, summaries = _paged([length])
    keys[0][target * BLOCK : (target + 1) * BLOCK] += 8 * direction
    summaries = new_summaries(summaries.shape[0] - 1, KV_HEADS, HEAD, torch.float32, torch.device("cpu"))
    page_selection.update_summaries(summaries, keys[0], (table[0, torch.arange(length) // BLOCK].long() * BLOCK
                                                         + torch.arange(length) % BLOCK), BLOCK)
    query = direction.repeat_interleave(HEADS // KV_HEADS, dim=0) * 4
    pages = reference_selection(query, keys[0], MIN_BUDGET_PAGES, BLOCK, SCALE)
    compacted, _ = SELECTIONS[implementation](query[None], summaries, table, torch.tensor([length]),
                                              torch.tensor([MIN_BUDGET_PAGES]))
    assert target in pages and int(table[0, target]) in compacted[0, :MIN_BUDGET_PAGES].tolist()


def test_the_kernels_select_over_contexts_longer_than_their_chunks():
    """A 2,500-page context, half of it chosen: the same tables as torch."""
    pages, budget = 2500, 1250
    generator = torch.Generator().manual_seed(4)
    table = torch.randperm(pages + 7, generator=generator)[: pages + 3].int().view(1, -1)
    keys = torch.randn(pages * BLOCK, KV_HEADS, HEAD, generator=generator)
    summaries = new_summaries(pages + 7, KV_HEADS, HEAD, torch.float32, torch.device("cpu"))
    positions = torch.arange(pages * BLOCK)
    page_selection.update_summaries(summaries, keys, table[0, positions // BLOCK].long() * BLOCK
                                    + positions % BLOCK, BLOCK)
    query = torch.randn(1, HEADS, HEAD, generator=generator)
    lengths, budgets = torch.tensor([pages * BLOCK - 5]), torch.tensor([budget])
    expected = _torch_select(query, summaries, table, lengths, budgets)
    compacted, selected = _triton_select(query, summaries, table, lengths, budgets)
    assert torch.equal(selected, expected[1].int()) and int(selected[0]) == budget * BLOCK - 5
    assert torch.equal(compacted[:, :pages], expected[0][:, :pages])


def test_the_kernels_break_ties_in_page_order():
    """Pages whose keys are all alike have equal masses: the earliest candidates fill the budget."""
    length, budget = 90 * BLOCK, 10
    _, table, _ = _paged([length])
    summaries = new_summaries(table.max() + 1, KV_HEADS, HEAD, torch.float32, torch.device("cpu"))
    same = torch.randn(KV_HEADS, HEAD, generator=torch.Generator().manual_seed(2)).expand(length, -1, -1)
    triton_page_selection.fold_summaries(summaries, same.contiguous(), table[0, torch.arange(length) // BLOCK].long()
                                         * BLOCK + torch.arange(length) % BLOCK, BLOCK)
    query = torch.randn(1, HEADS, HEAD, generator=torch.Generator().manual_seed(3))
    compacted, lengths = _triton_select(query, summaries, table, torch.tensor([length]), torch.tensor([budget]))
    picks = budget - SINK_PAGES - RECENT_PAGES
    pages = [*range(SINK_PAGES + picks), *range(90 - RECENT_PAGES, 90)]
    assert compacted[0, :budget].tolist() == table[0, pages].tolist() and int(lengths[0]) == budget * BLOCK


@pytest.mark.parametrize("implementation", UPDATES)
def test_a_reused_block_starts_a_fresh_summary(implementation):
    update_summaries = UPDATES[implementation]
    summaries = new_summaries(4, KV_HEADS, HEAD, torch.float32, torch.device("cpu"))
    big = torch.full((BLOCK, KV_HEADS, HEAD), 50.0)
    slots = torch.arange(2 * BLOCK, 3 * BLOCK)
    update_summaries(summaries, big, slots, BLOCK)
    assert summaries[2, :, 1].eq(50).all()
    small = torch.randn(5, KV_HEADS, HEAD)
    update_summaries(summaries, small, slots[:5], BLOCK)  # block 2 handed to a new sequence
    assert torch.equal(summaries[2, :, 0], small.amin(0)) and torch.equal(summaries[2, :, 1], small.amax(0))
    more = torch.randn(1, KV_HEADS, HEAD)
    update_summaries(summaries, more, slots[5:6], BLOCK)  # a decode step continues the block
    both = torch.cat([small, more])
    assert torch.equal(summaries[2, :, 0], both.amin(0)) and torch.equal(summaries[2, :, 1], both.amax(0))


def test_the_kernels_fold_the_same_summaries_as_torch():
    """Prefill chunks and decode steps of several sequences, with padding slots, into a scrambled paged cache."""
    lengths = [300, 45, 17 * BLOCK]
    _, _, expected = _paged(lengths, update=page_selection.update_summaries)
    _, _, folded = _paged(lengths, update=triton_page_selection.fold_summaries)
    written = expected[:-1, 0, 0, 0].isfinite()
    assert written.sum() == sum(-(-n // BLOCK) for n in lengths)
    assert torch.equal(folded[:-1][written], expected[:-1][written])


def test_the_memory_share_of_the_summaries_is_what_the_cache_sizing_subtracts():
    """`thresher serve` on the CPU sizes vLLM's cache so that cache and summaries together take --kv-cache-gib."""
    blocks, block = 100, 32
    summaries = new_summaries(blocks, KV_HEADS, HEAD, torch.bfloat16, torch.device("cpu"))
    kv_bytes = blocks * KV_HEADS * block * 2 * HEAD * 2  # vLLM's CPU layout: [blocks, kv_heads, block, 2 * head]
    summary_bytes = (summaries.numel() - KV_HEADS * 2 * HEAD) * summaries.element_size()  # less the padding row
    assert summary_bytes / kv_bytes == summary_bytes_per_kv_byte(block)


@pytest.mark.parametrize("budget", [1, 2, SINK_PAGES + RECENT_PAGES])
def test_a_budget_of_no_more_pages_than_the_sinks_and_the_newest_reads_only_those(budget):
    """Reachable with large KV blocks (a 128-token budget is 2 pages of 64 tokens): nothing else is chosen."""
    lengths = [700, 300]
    _, table, summaries = _paged(lengths)
    query = torch.randn(len(lengths), HEADS, HEAD, generator=torch.Generator().manual_seed(5))
    seq_lens, budgets = torch.tensor(lengths, dtype=torch.int32), torch.tensor([budget] * len(lengths))
    expected_table, expected_lengths = _torch_select(query, summaries, table, seq_lens, budgets)
    compacted, selected = _triton_select(query, summaries, table, seq_lens, budgets)
    assert torch.equal(selected, expected_lengths.int())
    for row, n in enumerate(lengths):
        pages = -(-n // BLOCK)
        fixed = SINK_PAGES + RECENT_PAGES
        assert int(selected[row]) == (fixed - 1) * BLOCK + n - (pages - 1) * BLOCK
        assert compacted[row, :fixed].tolist() == expected_table[row, :fixed].tolist()
