"""`thresher calibrate` says what it will do and how long it should take before it starts, records each stage, and
resumes from the statistics pass of a run that was interrupted after it."""

import json

import pytest
import torch

from tests.helpers import build_tiny_model, run_thresher
from thresher.artifact import load_artifact, model_identity
from thresher.calibration.statistics import (STATISTICS_CHECKPOINT, StatisticsCheckpoint,
                                             collect_activation_statistics)
from thresher.calibration.thresholds import fit_channel_thresholds
from thresher.models import load_hf_model, resolve_model

ARGS = ("--levels", "0.5", "--max-tokens", "1024", "--eval-tokens", "0", "--refine-tokens", "0", "--no-sae")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, embedded_model):
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("LlamaForCausalLM", directory, embedded_model.path)
    return directory


def test_calibrate_prints_a_plan_and_records_its_stages(tiny_llama, tmp_path):
    result = run_thresher("calibrate", "--model", str(tiny_llama), "--out", str(tmp_path / "a"), *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibration plan on cpu" in result.stderr and "1,024 tokens" in result.stderr
    stages = json.loads((tmp_path / "a" / "manifest.json").read_text())["calibration"]["stages"]
    assert [s["stage"] for s in stages] == ["statistics"]
    assert stages[0]["seconds"] > 0 and stages[0]["peak_host_gib"] > 0
    assert not (tmp_path / "a" / STATISTICS_CHECKPOINT).exists()


def test_a_users_text_file_calibrates_and_reports_on_its_held_out_part(tiny_llama, tmp_path):
    from thresher.data import default_texts

    data = tmp_path / "notes.txt"
    data.write_text("\n\n".join(default_texts("calibration")[:24]))
    out = tmp_path / "c"
    result = run_thresher("calibrate", "--model", str(tiny_llama), "--out", str(out), "--data", str(data),
                          *ARGS, "--eval-tokens", "512")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == str(data) and report["tokens"] == 512
    assert json.loads((out / "manifest.json").read_text())["calibration"]["data"] == str(data)


def test_an_interrupted_calibration_resumes_after_its_statistics_pass(tiny_llama, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    resolved = resolve_model(tiny_llama)
    model, _tokenizer = load_hf_model(resolved)
    torch.manual_seed(0)
    # statistics of other text than calibrate's own: if it resumes, its thresholds are these statistics' fit
    stats = collect_activation_statistics(model, torch.randint(0, 30000, (2, 512)).tolist())
    key = {"fingerprint": model_identity(tiny_llama).fingerprint, "data": "None", "tokens": 1024}
    StatisticsCheckpoint(out / STATISTICS_CHECKPOINT, key).save(stats)
    result = run_thresher("calibrate", "--model", str(tiny_llama), "--out", str(out), *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr
    expected, _ = fit_channel_thresholds(stats, [0.5])
    artifact = load_artifact(out)
    assert all(torch.equal(artifact.thresholds[name], table) for name, table in expected.items())
    assert not (out / STATISTICS_CHECKPOINT).exists()


def test_a_checkpoint_of_another_setup_is_not_used(tiny_llama, tmp_path):
    resolved = resolve_model(tiny_llama)
    model, _tokenizer = load_hf_model(resolved)
    stats = collect_activation_statistics(model, torch.randint(0, 30000, (1, 512)).tolist())
    path = tmp_path / STATISTICS_CHECKPOINT
    StatisticsCheckpoint(path, {"tokens": 1}).save(stats)
    assert StatisticsCheckpoint(path, {"tokens": 2}).load() is None
    loaded = StatisticsCheckpoint(path, {"tokens": 1}).load()
    assert loaded.tokens == stats.tokens
    assert all(torch.equal(loaded.histograms[n].counts, h.counts) for n, h in stats.histograms.items())
