"""Where calibration runs: a device that is not there is a clear error; on a CUDA GPU the statistics match the CPU's
and a whole calibrate + eval runs there."""

import json

import pytest
import torch

from tests.helpers import run_thresher
from thresher import data
from thresher.calibration.pipeline import _windows
from thresher.calibration.statistics import collect_activation_statistics

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("device", "message"), [("tpu", "device must be auto, cpu or cuda"),
                                                 pytest.param("cuda", "no CUDA GPU", marks=pytest.mark.skipif(
                                                     torch.cuda.is_available(), reason="this machine has one"))])
def test_a_device_that_is_not_there_is_a_clear_error(embedded_model, tmp_path, device, message):
    result = run_thresher("calibrate", "--out", str(tmp_path / "artifact"), "--device", device)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "artifact").exists()


@needs_cuda
def test_statistics_on_the_gpu_match_the_cpu(embedded_model, hf_model):
    from thresher.models import load_hf_model

    cpu_model, tokenizer = hf_model
    gpu_model, _ = load_hf_model(embedded_model, device="cuda")
    windows = _windows(data.load_texts(None, "calibration"), tokenizer, 1024, "calibration")
    on_cpu = collect_activation_statistics(cpu_model, windows)
    on_gpu = collect_activation_statistics(gpu_model, windows)
    assert on_gpu.tokens == on_cpu.tokens == 1024
    for name, cpu in on_cpu.histograms.items():
        gpu = on_gpu.histograms[name]
        assert gpu.counts.device.type == "cpu" and gpu.counts.sum() == cpu.counts.sum()
        # fp32 rounding differs between the two, which moves the odd activation across a bin edge
        assert float((gpu.counts - cpu.counts).abs().sum() / cpu.counts.sum()) < 0.01, name
        assert float(gpu.costs.sum()) == pytest.approx(float(cpu.costs.sum()), rel=0.01), name


@needs_cuda
def test_calibrate_and_eval_on_the_gpu(embedded_model, tmp_path):
    out = tmp_path / "artifact"
    result = run_thresher("calibrate", "--out", str(out), "--device", "cuda", "--levels", "0.25,0.5",
                          "--max-tokens", "2048", "--eval-tokens", "0", "--sae-tokens", "16384", "--sae-epochs", "2",
                          "--sae-finetune-tokens", "2048", "--refine-tokens", "2048")
    assert result.returncode == 0, result.stderr
    assert "calibrating on cuda" in result.stderr
    result = run_thresher("eval", "--artifact", str(out), "--device", "cuda", "--max-tokens", "2048", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    first, second = report["levels"]
    assert first["measured_sparsity"] == pytest.approx(0.25, abs=0.03)
    assert second["measured_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert 0 < first["kl_from_dense"] < second["kl_from_dense"]
    sae = report["sae"]
    assert sae["l0"] == pytest.approx(32, abs=0.5) and sae["fvu"] < 0.5 and sae["dead_fraction"] < 0.5
