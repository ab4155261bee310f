"""The reference artifact shipped for the embedded default model: it loads, matches the model, is refused with a
clear error when damaged or fitted on another model, and a cheap part of it (the contrastive steering vectors) is
re-derived from the embedded model and compared."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from thresher.artifact import REFERENCE_ARTIFACTS, ArtifactError, load_artifact, model_identity, reference_artifact
from thresher.steering import SteeringAssets


@pytest.fixture(scope="module")
def identity(embedded_model):
    return model_identity(embedded_model.path, embedded_model.name)


def test_the_reference_artifact_matches_the_embedded_model(identity):
    directory = reference_artifact(identity)
    assert directory == REFERENCE_ARTIFACTS / "SmolLM2-135M-Instruct"
    artifact = load_artifact(directory, model=identity)
    assert artifact.levels == [0.0, 0.25, 0.4, 0.5, 0.6] and artifact.method == "channel-greedy"
    assert artifact.calibration["tokens"] == 24576
    assets = SteeringAssets(directory, identity.hidden_size)
    assert assets.layer == 15 and assets.sae.d_sae == 4608 and len(assets.catalog) > 4000
    assert sorted(assets.vector_info) == ["formal", "positive", "terse"]
    # measured by `thresher steering-eval` (bench/RESULTS.md), served as the suggestions
    assert {name: info["suggested_strength"] for name, info in assets.vector_info.items()} == {
        "formal": 0.5435, "positive": 1.768, "terse": 0.279}
    assert sum("suggested_strength" in entry and "suggested_clamp" in entry for entry in assets.catalog) == 16
    report = json.loads((directory / "report.json").read_text())
    assert [entry["level"] for entry in report["levels"]] == [0.25, 0.4, 0.5, 0.6]


def test_no_reference_for_other_models(identity):
    assert reference_artifact(replace(identity, name="my-llama")) is None


def test_a_damaged_reference_artifact_is_refused(identity, tmp_path):
    root = tmp_path / "reference"
    shutil.copytree(REFERENCE_ARTIFACTS / identity.name, root / identity.name)
    vectors = root / identity.name / "vectors" / "vectors.safetensors"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="reference artifact shipped for SmolLM2-135M-Instruct cannot serve it: "
                                            ".*vectors.safetensors is damaged"):
        reference_artifact(identity, root=root)


def test_a_reference_artifact_of_another_model_is_refused(identity):
    with pytest.raises(ArtifactError, match="calibrated for model 'SmolLM2-135M-Instruct'.*fingerprint 00"):
        reference_artifact(replace(identity, fingerprint="0000000000000000"))


def test_its_steering_vectors_are_rederived_from_the_embedded_model(identity, hf_model):
    """The vectors are the cheapest whole stage of the recorded calibration: the same pairs through the same model."""
    from thresher.calibration.vectors import contrastive_vectors, read_pairs

    model, tokenizer = hf_model
    assets = SteeringAssets(REFERENCE_ARTIFACTS / identity.name, identity.hidden_size)
    residual_norm = next(iter(assets.vector_info.values()))["residual_norm"]
    vectors, info = contrastive_vectors(model, tokenizer, read_pairs(None), assets.layer, residual_norm)
    for name, vector in vectors.items():
        shipped = assets.vectors[name].float()
        assert torch.nn.functional.cosine_similarity(vector, shipped, dim=0) > 0.999, name
        assert float(vector.norm()) == pytest.approx(float(shipped.norm()), rel=1e-3), name
        # the rule of thumb; the served suggestion is the steering sweep's measured best
        assert info[name]["suggested_strength"] == pytest.approx(assets.vector_info[name]["rule_of_thumb_strength"],
                                                                 rel=1e-2)


def test_steering_tables_stay_float32_under_a_bfloat16_default(identity):
    """vLLM builds a model (and thresher's steering state with it) under the model's dtype as torch's default; the
    SAE and the clamp tables must stay in float32, or a bf16 engine fails its first forward (a float32 stream
    times a bf16 encoder)."""
    from thresher.engine.token_steering import TokenSteering

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assets = SteeringAssets(REFERENCE_ARTIFACTS / identity.name, identity.hidden_size)
        steering = TokenSteering(assets, max_tokens=8, max_specs=2, dtype=torch.bfloat16, device=torch.device("cpu"))
    finally:
        torch.set_default_dtype(previous)
    assert assets.sae.W_enc.dtype == torch.float32
    assert steering.table.dtype == torch.bfloat16
    assert all(table.dtype == torch.float32 for table in steering.clamps)
