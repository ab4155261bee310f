"""Attention budgets on a CUDA vLLM (GPU machine only): the Triton selection feeding FlashAttention.

At the kernel level, FlashAttention over the compacted tables (with the split plan vLLM made for the dense lengths)
is attention over exactly the selected tokens, and the whole step replays from a CUDA graph. In the engine (a small
randomly initialised Llama with 128-wide heads, whose attention is far from uniform, unlike vLLM's dummy weights;
CUDA graphs on, vLLM 0.26's V2 runner), a budget that covers the context is dense attention to the bit, a small one
changes what decode reads, and a budgeted neighbour changes nothing for an unbudgeted request; steps with no request
over its budget replay CUDA graphs captured without the selection.
"""

import json
import math
import os

import pytest
import torch

from tests.engine.engines import engine, shutdown
from tests.helpers import build_tiny_model
from thresher.artifact import Artifact, dense_thresholds, model_identity
from thresher.engine import engine_overrides, request_extras
from thresher.kernels import page_selection, triton_page_selection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and CUDA vLLM")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16
SCALE = HEAD**-0.5


def _paged_cache(lengths, seed=0):
    """Random keys and values of several sequences in a scrambled paged cache, their summaries and block table."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    pages = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(pages) + 8
    keys = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, device="cuda", generator=generator).bfloat16()
    values = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, device="cuda", generator=generator).bfloat16()
    order = torch.randperm(num_blocks, device="cuda", generator=generator)
    table = torch.zeros(len(lengths), max(pages) + 5, dtype=torch.int32, device="cuda")
    start = 0
    for row, count in enumerate(pages):
        table[row, :count] = order[start : start + count].int()
        start += count
    summaries = page_selection.new_summaries(num_blocks, KV_HEADS, HEAD, torch.bfloat16, torch.device("cuda"))
    for row, n in enumerate(lengths):
        positions = torch.arange(n, device="cuda")
        slots = table[row, positions // BLOCK].long() * BLOCK + positions % BLOCK
        triton_page_selection.fold_summaries(summaries, keys.view(-1, KV_HEADS, HEAD)[slots], slots, BLOCK)
    return keys, values, table, summaries


def _reference_attention(query, keys, values, table, lengths):
    """fp32 attention of each sequence's one query over the first `lengths[i]` tokens of its table's blocks."""
    out = []
    for row, n in enumerate(lengths.tolist()):
        blocks = table[row, : -(-n // BLOCK)].long()
        k = keys[blocks].flatten(0, 1)[:n].float().repeat_interleave(HEADS // KV_HEADS, dim=1)  # [n, heads, head]
        v = values[blocks].flatten(0, 1)[:n].float().repeat_interleave(HEADS // KV_HEADS, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", query[row].float(), k) * SCALE, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(out)


def _plan(query, plan_lens):
    """FlashAttention's ahead-of-time split plan for these lengths, as vLLM makes it before a step."""
    from vllm.vllm_flash_attn import get_scheduler_metadata

    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32, device="cuda")
    longest = int(plan_lens.max())
    plan = get_scheduler_metadata(batch_size=query.shape[0], max_seqlen_q=1, max_seqlen_k=longest,
                                  num_heads_q=HEADS, num_heads_kv=KV_HEADS, headdim=HEAD, cache_seqlens=plan_lens,
                                  qkv_dtype=torch.bfloat16, cu_seqlens_q=starts, page_size=BLOCK, causal=True,
                                  num_splits=32)
    return longest, plan


def _flash(query, keys, values, table, seq_lens, plan):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32, device="cuda")
    longest, plan = plan
    return flash_attn_varlen_func(q=query, k=keys, v=values, max_seqlen_q=1, cu_seqlens_q=starts,
                                  max_seqlen_k=longest, seqused_k=seq_lens, softmax_scale=SCALE, causal=True,
                                  block_table=table, scheduler_metadata=plan, num_splits=32, fa_version=3)


def test_flash_attention_over_compacted_tables_reads_exactly_the_selected_tokens():
    lengths = torch.tensor([32000, 5000, 900, 20011], dtype=torch.int32, device="cuda")
    budgets = torch.tensor([128, 64, 0, 256], device="cuda")
    keys, values, table, summaries = _paged_cache(lengths.tolist())
    query = torch.randn(4, HEADS, HEAD, device="cuda").bfloat16() * 2
    starts = torch.arange(5, dtype=torch.int32, device="cuda")
    compacted, selected = triton_page_selection.select_pages(query, starts, summaries, table, lengths, budgets,
                                                             BLOCK, SCALE)
    expected_table, expected_lens = page_selection.select_pages(query, summaries, table, lengths, budgets, BLOCK,
                                                                SCALE)
    assert torch.equal(selected, expected_lens)
    for row in range(4):  # the same pages, up to near-ties of the two summation orders
        kept = -(-int(selected[row]) // BLOCK)
        same = set(compacted[row, :kept].tolist()) & set(expected_table[row, :kept].tolist())
        assert len(same) >= kept - 2, row
    read = -(-900 // BLOCK)  # the pages a sequence without a budget reads: its own
    assert selected[2] == 900 and torch.equal(compacted[2, :read], table[2, :read])
    out = _flash(query, keys, values, compacted, selected, _plan(query, lengths))
    reference = _reference_attention(query, keys, values, compacted, selected)
    assert (out.float() - reference).abs().max() < 2e-2
    dense = _flash(query, keys, values, table, lengths, _plan(query, lengths))
    assert torch.equal(dense[2], out[2])  # the unbudgeted sequence: the same kernel work, bit for bit


def test_the_selected_step_replays_from_a_cuda_graph():
    lengths = torch.tensor([9000, 3000], dtype=torch.int32, device="cuda")
    keys, values, table, summaries = _paged_cache(lengths.tolist(), seed=1)
    query = torch.zeros(2, HEADS, HEAD, device="cuda", dtype=torch.bfloat16)
    budgets = torch.zeros(2, dtype=torch.long, device="cuda")
    starts = torch.arange(3, dtype=torch.int32, device="cuda")
    plan = _plan(query, lengths)

    def step():
        compacted, selected = triton_page_selection.select_pages(query, starts, summaries, table, lengths, budgets,
                                                                 BLOCK, SCALE)
        return _flash(query, keys, values, compacted, selected, plan)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed, budget in ((2, [128, 0]), (3, [0, 0]), (4, [64, 96])):
        query.copy_(torch.randn(2, HEADS, HEAD, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        budgets.copy_(torch.tensor(budget))
        graph.replay()
        assert torch.equal(captured, step()), budget


PROMPT = 3000
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    # the engine core in this process (`engines.engine`), which adds every request of a `generate` before its first
    # step: each batch is the same mix of rows run after run. With vLLM's engine core in a process of its own, a
    # request could miss the first step, and a step of 1-2 rows runs the sparse kernel, whose atomics vary its last
    # bits from run to run (seen on an H100: identical runs parted)
    model = tmp_path_factory.mktemp("tiny-llama-long")
    build_tiny_model("LlamaForCausalLM", model, hidden_size=512, num_layers=2)  # 4 heads of 128, 2 KV heads
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    identity = model_identity(model)
    artifact = tmp_path_factory.mktemp("artifact")
    Artifact(identity, [0.0], "synthetic", dense_thresholds(identity, 1)).save(artifact)
    # every prompt prefilled in one step (3 x 3,000 tokens), so that the three requests decode together to the end
    llm = engine(model=str(model), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096, max_num_seqs=4,
                 max_num_batched_tokens=16384, gpu_memory_utilization=0.4, seed=0, enable_prefix_caching=False,
                 hf_overrides=engine_overrides(model, artifact),
                 worker_extension_cls="thresher.engine.measurement.ThresherWorkerExtension")
    assert llm.collective_rpc("thresher_selects_pages")[0]
    yield llm
    shutdown(llm)


def _generate(llm, budgets, seeds):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    for budget, seed in zip(budgets, seeds):
        tokens = torch.randint(3, 32000, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()
        prompts.append(TokensPrompt(prompt_token_ids=tokens))
        extra_args, _ = request_extras(0.0, None, budget)
        params.append(SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5,
                                     extra_args=extra_args))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: p.logprob for t, p in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs]


def test_a_covering_budget_is_dense_attention_and_a_small_one_reads_its_pages(llm):
    """Batches of three requests (see the next test for why three), the first one's output compared."""
    llm.collective_rpc("thresher_attention_pages")
    dense, covered, small = (_generate(llm, [budget, 0, 0], [0, 1, 2])[0] for budget in (0, 4096, 256))
    assert covered == dense
    assert small[1] != dense[1]  # the budgeted decode steps read other keys
    read, total = llm.collective_rpc("thresher_attention_pages")[0]
    pages = math.ceil(PROMPT / BLOCK)
    # only budgeted requests count: the covering one's steps read every page; the small one's 16 of about `pages`
    assert total > 2 * (NEW_TOKENS - 1) * pages * 0.99
    assert read < total * (1 + 16 / pages) / 2 + 1


def test_only_steps_with_a_request_over_its_budget_replay_the_selection(llm):
    """V2 captures its full decode graphs twice, with and without the selection, and a step replays the second set
    unless a request is over its budget."""
    def replays():
        counts = llm.collective_rpc("thresher_graph_replays")[0]
        return counts["selecting"], counts["not selecting"]

    counts = llm.collective_rpc("thresher_graph_replays")[0]
    assert counts["captured selecting"] == counts["captured not selecting"] > 0
    before = replays()
    _generate(llm, [4096, 0, 0], [0, 1, 2])  # the budget covers the context
    covered = replays()
    assert covered[0] == before[0] and covered[1] > before[1]
    _generate(llm, [256, 0, 0], [0, 1, 2])
    small = replays()
    assert small[0] > covered[0] and small[1] == covered[1]


def test_a_budgeted_neighbour_changes_nothing_for_an_unbudgeted_request(llm):
    """The same three-request batch shape twice: the unbudgeted requests' outputs do not depend on whether their
    neighbour has a budget. Three rows, because decode batches of 1-2 rows run the sparse kernel, which adds its
    partial sums with atomics: their last bits vary from run to run, budgets or not (seen on an H100 with two rows);
    from three rows the projections run cuBLAS, and a fixed batch is deterministic."""
    with_budget = _generate(llm, [256, 0, 0], [1, 2, 3])
    without = _generate(llm, [0, 0, 0], [1, 2, 3])
    assert with_budget[1:] == without[1:]
    assert with_budget[0] != without[0]
