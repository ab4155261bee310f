"""`thresher steering-eval` on a tiny budget, on a copy of the shipped reference artifact (the SAE and vectors that
users steer with): the sweep measures what it claims, and its best strengths become the served suggestions."""

import json
import shutil

import pytest
import torch

from tests.helpers import run_thresher
from thresher.artifact import REFERENCE_ARTIFACTS, SWEEP, load_artifact
from thresher.calibration.steering_eval import (SweepConfig, evaluate_steering, promoted_top_tokens, sample_features,
                                               summarize)
from thresher.steering import SteeringAssets

TINY = SweepConfig(instructions=2, new_tokens=12, features=16, vector_multiples=(1.0,), feature_strengths=(2.0, 8.0),
                   clamp_multiples=(8.0,))


@pytest.fixture(scope="module")
def swept(embedded_model, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("reference") / "artifact"
    shutil.copytree(REFERENCE_ARTIFACTS / "SmolLM2-135M-Instruct", artifact)
    report = tmp_path_factory.mktemp("report")
    return artifact, report, evaluate_steering(artifact, config=TINY, report_dir=report)


def test_features_activation_rises_with_strength(swept):
    """On 2 instructions x 12 tokens: the feature's own activation, read by the unsteered model on the generated
    text, rises with the added strength for some of the features the rule samples, and the summary says for which
    (the full sweep's share is in bench/RESULTS.md: far from the issue's 80%)."""
    _artifact, _report, result = swept
    assert len(result["features"]) == 16
    summary = result["summary"]
    for feature in result["features"]:
        rows = sorted((r["strength"], r) for r in result["rows"]
                      if r["target"] == f"feature {feature}" and r["mode"] == "add")
        readings = [rows[0][1]["reading_unsteered"]] + [r["reading"] for _, r in rows]
        rises = readings[-1] > readings[0] and readings == sorted(readings)
        assert summary["features"][f"feature {feature}"]["add_monotonic"] == rises, (feature, readings)
    assert summary["features_monotonic_when_added"] > 0, summary


def test_every_vector_runs_beside_its_controls_and_the_report_is_written(swept):
    artifact, report, result = swept
    for name, info in SteeringAssets(artifact, 576).vector_info.items():
        kinds = {r["kind"] for r in result["rows"] if r["target"] == name}
        assert kinds == {"vector", "random direction", "flipped"}, name
        # the shipped artifact holds a stored sweep already: the grid stays on the rule of thumb, not that best
        strengths = {r["strength"] for r in result["rows"] if r["target"] == name}
        assert strengths == {round(info["rule_of_thumb_strength"] * m, 4) for m in TINY.vector_multiples}, name
    assert result["rows"][0]["kind"] == "unsteered"
    assert all(0 <= r["combined"] <= 1 and r["perplexity"] > 0 for r in result["rows"][1:])
    assert json.loads((report / "steering_report.json").read_text())["best"] == result["best"]
    assert (report / "steering_report.png").stat().st_size > 0


def test_the_best_strengths_are_stored_and_served_as_suggestions(swept):
    artifact, _report, result = swept
    load_artifact(artifact)  # the manifest covers the sweep's file
    assert json.loads((artifact / SWEEP).read_text())["best"] == result["best"]
    assets = SteeringAssets(artifact, 576)
    for name, info in assets.vector_info.items():
        assert info["suggested_strength"] == result["best"][f"{name}:add"]["strength"]
        assert "rule_of_thumb_strength" in info
    feature = result["features"][0]
    entry = assets.feature(feature)
    assert entry["suggested_strength"] == result["best"][f"feature {feature}:add"]["strength"]
    assert entry["suggested_clamp"] == result["best"][f"feature {feature}:clamp"]["strength"]


def test_a_vector_steers_only_above_the_unsteered_text_and_its_random_control():
    """The issue's vector target: the judge's gain over the unsteered text is positive, larger than the random
    direction's, and the perplexity stays within the bound (gains as measured for terse on 12 x 48: -0.001 against
    -0.019)."""
    measured = {"terse": (-0.001, -0.019, 2.4), "formal": (0.107, 0.041, 2.4), "positive": (0.05, 0.002, 3.6),
                "calm": (0.03, 0.04, 2.4)}
    rows, best = [], {}
    for name, (gain, random_gain, perplexity) in measured.items():
        for kind, judge_gain in (("vector", gain), ("random direction", random_gain)):
            rows.append({"target": name, "kind": kind, "mode": "add", "strength": 0.5, "judge_gain": judge_gain,
                         "perplexity": perplexity})
        best[f"{name}:add"] = {"target": name, "mode": "add", "strength": 0.5, "combined": 0.0}
    vectors = summarize(rows, best, unsteered_perplexity=2.0, max_fluency_ratio=1.5)["vectors"]
    assert {name: v["steers"] for name, v in vectors.items()} == {"terse": False, "formal": True, "positive": False,
                                                                   "calm": False}


def test_a_bad_request_is_refused_before_any_work(tmp_path):
    result = run_thresher("steering-eval", "--artifact", str(tmp_path / "absent"))
    assert result.returncode == 2 and "absent" in result.stderr
    result = run_thresher("steering-eval", "--artifact", str(tmp_path), "--instructions", "100")
    assert result.returncode == 2 and "--instructions" in result.stderr
    for option, value in (("--new-tokens", "0"), ("--features", "-1")):
        result = run_thresher("steering-eval", "--artifact", str(tmp_path), option, value)
        assert result.returncode == 2 and option in result.stderr


def test_a_feature_clamped_twice_ends_at_its_last_value():
    assets = SteeringAssets(REFERENCE_ARTIFACTS / "SmolLM2-135M-Instruct", 576)
    spec = assets.parse({"features": [{"id": 7, "clamp": 2.0}, {"id": 9, "strength": 1.0}, {"id": 7, "clamp": 5.0}]})
    rows = assets.clamp_rows(spec)
    assert rows.values.tolist() == [5.0] and torch.equal(rows.encoder[0], assets.sae.W_enc[:, 7].detach())


def test_the_rule_samples_features_whose_decoder_row_writes_their_own_tokens(hf_model):
    """Decoder rows made of token unembeddings: the row of " river" + " water" promotes both tokens, its negation
    neither; with the default bar of 2 the rule keeps only the first. Ids are not the rows' positions in the
    catalog, and the old catalogs' text-only tokens count too."""
    from types import SimpleNamespace

    model, tokenizer = hf_model
    river, water = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (" river", " water"))
    unembedding = model.get_output_embeddings().weight.detach().float()
    both = unembedding[river] / unembedding[river].norm() + unembedding[water] / unembedding[water].norm()
    sae = SimpleNamespace(W_dec=torch.stack([torch.zeros_like(both), -both, both]).half())
    tokens = [{"token": " river", "token_id": river}, {"token": " water"}]
    catalog = [{"id": i, "density": 0.01, "top_tokens": tokens} for i in (2, 1)]
    promoted = promoted_top_tokens(model, tokenizer, sae, catalog, top_logits=SweepConfig.top_logits)
    assert promoted == {2: 2, 1: 0}
    sampled = sample_features(catalog, 16, SweepConfig.density_range, promoted, SweepConfig.min_promoted)
    assert [e["id"] for e in sampled] == [2]
    assert sample_features(catalog, 0, SweepConfig.density_range, promoted, 0) == []  # --features 0: vectors only
    assert [e["id"] for e in sample_features(catalog, 1, SweepConfig.density_range, promoted, 0)] == [1]
