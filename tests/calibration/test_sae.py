"""SAE training, the SAELens layout, and the steering assets of a calibrated artifact."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from thresher.calibration.evaluate import dense_log_probs, kl_from_dense, sae_spliced
from thresher.calibration.sae_finetune import FineTuneConfig, finetune_sae_end_to_end
from thresher.calibration.sae_training import Residuals, TrainingConfig, measure_sae, train_topk_sae
from thresher.data import load_texts, token_windows
from thresher.sae import SAEError, SparseAutoencoder, load_sae
from tests.helpers import (STEERING_STRENGTHS, densest_features, mean_activation_by_strength,
                           reference_steered_generation)
from thresher.steering import SteeringAssets, SteeringError


def _synthetic_residuals(d_in=32, atoms=96, active=3, tokens=24576, seed=0):
    """Tokens that are sums of `active` atoms of one fixed unit-norm dictionary, with positive coefficients."""
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d_in, generator=torch.Generator().manual_seed(0)),
                                               dim=1)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(atoms, generator=generator)[:active] for _ in range(tokens)])
    coefficients = 0.5 + torch.rand(tokens, active, generator=generator)
    vectors = (coefficients[..., None] * dictionary[chosen]).sum(dim=1)
    return dictionary, Residuals(layer=0, vectors=vectors, token_ids=torch.zeros(tokens, dtype=torch.long),
                                 window_length=tokens)


def test_topk_sae_recovers_a_known_dictionary():
    dictionary, residuals = _synthetic_residuals()
    config = TrainingConfig(expansion=4, k=3, epochs=12, batch_size=256, learning_rate=3e-3, aux_k=32,
                            dead_after_tokens=20_000)
    sae = train_topk_sae(residuals, config)
    cosine = dictionary @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).t()
    recovered = (cosine.max(dim=1).values > 0.9).float().mean()
    assert recovered >= 0.8, f"only {recovered:.0%} of the atoms have a decoder row with cosine > 0.9"
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-4)
    _, held_out = _synthetic_residuals(tokens=2048, seed=1)
    quality = measure_sae(sae, held_out.vectors)
    assert quality.fvu < 0.1 and quality.l0 <= 3


def test_saelens_layout_round_trip(tmp_path):
    sae = SparseAutoencoder(d_in=16, d_sae=64, k=4, hook_layer=3, model_name="tiny")
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.uniform_(-1, 1)
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["architecture"] == "topk" and cfg["hook_layer"] == 3
    loaded = load_sae(tmp_path / "sae", d_in=16)
    assert tuple(loaded.W_enc.shape) == (16, 64) and tuple(loaded.W_dec.shape) == (64, 16)
    x = torch.randn(5, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    with pytest.raises(SAEError, match="width 16, but the model's hidden size is 576"):
        load_sae(tmp_path / "sae", d_in=576)


def test_an_sae_trained_elsewhere_loads(tmp_path):
    """A ReLU ('standard') SAE written by another tool, with only the SAELens fields."""
    from safetensors.torch import save_file

    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 32, "hook_name": "blocks.5.hook_resid_post"}))
    weights = {"W_enc": torch.randn(8, 32), "b_enc": torch.zeros(32), "W_dec": torch.randn(32, 8),
               "b_dec": torch.zeros(8)}
    save_file(weights, tmp_path / "sae_weights.safetensors")
    sae = load_sae(tmp_path, d_in=8)
    assert sae.hook_layer == 5 and sae.architecture == "standard"
    assert torch.allclose(sae.encode(torch.ones(1, 8)), (torch.ones(1, 8) @ weights["W_enc"]).relu())
    weights["W_dec"] = torch.randn(32, 9)
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SAEError, match="W_dec has shape"):
        load_sae(tmp_path)


@pytest.fixture(scope="module")
def assets(small_artifact, embedded_model):
    from thresher.artifact import model_identity

    return SteeringAssets(small_artifact, model_identity(embedded_model.path).hidden_size)


def test_calibrated_artifact_reports_sae_quality_and_has_a_catalog(small_artifact, assets, embedded_model):
    from transformers import AutoTokenizer

    from thresher.calibration.catalog import _token_text

    report = json.loads((small_artifact / "report.json").read_text())
    sae = report["sae"]
    assert sae["layer"] == 15 and sae["d_sae"] == 8 * 576 and sae["k"] == 32 and sae["l0"] <= 32
    # a small test budget (8k tokens, 2 epochs); the default calibration's numbers are in the README
    assert 0 < sae["fvu"] < 0.7, sae
    assert sae["perplexity_increase"] > -0.5 and sae["kl_from_dense"] > 0
    end_to_end = json.loads((small_artifact / "manifest.json").read_text())["calibration"]["steering"]["end_to_end"]
    assert end_to_end["steps"] == 2 and end_to_end["kl_first"] > 0, end_to_end
    # dead: never fired on the training tokens, i.e. not in the catalog; silent: never fired on the held-out tokens
    assert sae["dead_fraction"] == round(1 - len(assets.catalog) / sae["d_sae"], 4) < 1
    assert 0 <= sae["held_out_silent_fraction"] <= 1
    assert len(assets.catalog) > 100
    entry = assets.catalog[0]
    assert entry["label"] and entry["top_tokens"] and entry["top_contexts"] and 0 < entry["density"] <= 1
    top = entry["top_tokens"][0]
    word = top["token"].strip()
    assert _token_text(AutoTokenizer.from_pretrained(embedded_model.path), top["token_id"]) == top["token"], top
    assert any(e["id"] == entry["id"] for e in assets.search_features(word, limit=len(assets.catalog)))
    assert assets.search_features("no such text anywhere 1234567") == []
    assert set(assets.vector_info) == {"formal", "positive", "terse"}
    assert all(info["layer"] == 15 and info["suggested_strength"] > 0 for info in assets.vector_info.values())


def test_steering_specs_are_validated_against_the_artifact(assets):
    spec = assets.parse({"features": [{"id": 3, "strength": 2}], "vectors": [{"name": "formal", "strength": 1}]})
    assert spec.layer is None and assets.direction(spec).shape == (576,)
    cases = [
        ({"features": [{"id": 10**6, "strength": 1}]}, "steering.features.0.id"),
        ({"vectors": [{"name": "sarcastic", "strength": 1}]}, "steering.vectors.0.name"),
        ({"vectors": [{"name": "formal", "strength": float("nan")}]}, "steering.vectors.0.strength"),
        ({"vectors": [{"name": "formal", "strength": 1e6}]}, "steering.vectors.0.strength"),
        ({"layer": 3, "vectors": [{"name": "formal", "strength": 1}]}, "steering.layer"),
        ({"features": [{"id": i, "strength": 1} for i in range(9)]}, "steering.features"),
        ({"features": [{"id": "three", "strength": 1}]}, "steering.features.0.id"),
        ({"colour": "blue"}, "steering.colour"),
    ]
    for raw, param in cases:
        with pytest.raises(SteeringError) as error:
            assets.parse(raw)
        assert error.value.param == param, (raw, str(error.value))


@pytest.mark.slow
def test_adding_a_feature_direction_raises_that_feature_on_generated_text(hf_model, assets):
    """Offline (transformers): steer with each of the densest features and re-read the generated text unsteered."""
    model, tokenizer = hf_model
    prompt_ids = tokenizer("The capital of France is")["input_ids"]
    generated = {}
    for feature in densest_features(assets):
        for strength in STEERING_STRENGTHS:
            direction = assets.direction(assets.parse({"features": [{"id": feature, "strength": strength}]}))
            generated[feature, strength] = reference_steered_generation(model, direction, assets.layer, prompt_ids,
                                                                        max_new_tokens=24)
    activations = mean_activation_by_strength(model, assets, prompt_ids, generated)
    assert activations[0] < activations[1] < activations[2], activations


def _spliced_kl(model, sae, windows) -> float:
    """Mean KL divergence per token of the model with `sae` spliced in from the dense model."""
    ids = torch.tensor(windows)
    dense = dense_log_probs(model, ids)
    with torch.no_grad(), sae_spliced(model, sae):
        return float(kl_from_dense(model(ids, use_cache=False).logits, dense))


def test_end_to_end_finetune_brings_the_spliced_model_closer_to_the_dense_one(hf_model, assets):
    model, tokenizer = hf_model
    windows = list(token_windows(load_texts(None, "calibration"), tokenizer, 256, 10 * 256))
    # 2,048 held-out tokens: on 512 the KL's noise was as big as the margin of the check below
    held_out = list(token_windows(load_texts(None, "evaluation"), tokenizer, 256, 8 * 256))
    sae = copy.deepcopy(assets.sae)
    before = _spliced_kl(model, sae, held_out)
    summary = finetune_sae_end_to_end(model, sae, windows, FineTuneConfig(learning_rate=1e-3))
    after = _spliced_kl(model, sae, held_out)
    assert summary["steps"] == 5 and after < 0.95 * before, (before, after, summary)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-4)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # the model stays untouched


def test_an_sae_written_in_half_precision_reconstructs_as_well(assets, hf_model, tmp_path):
    """`--sae-dtype float16` (the reference artifact's) costs nothing measurable: held-out FVU and L0 as in float32."""
    from thresher.calibration.sae_training import attention_sink_mask, collect_residuals

    model, tokenizer = hf_model
    windows = list(token_windows(load_texts(None, "evaluation"), tokenizer, 512, 2048))
    residuals = collect_residuals(model, windows, assets.sae.hook_layer).vectors
    residuals = residuals[attention_sink_mask(residuals)]
    assets.sae.save(tmp_path / "half", dtype=torch.float16)
    half = load_sae(tmp_path / "half")
    assert json.loads((tmp_path / "half" / "cfg.json").read_text())["dtype"] == "float16"
    full, halved = measure_sae(assets.sae, residuals), measure_sae(half, residuals)
    assert halved.fvu == pytest.approx(full.fvu, abs=1e-3) and halved.l0 == pytest.approx(full.l0, abs=0.05)
