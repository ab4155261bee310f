"""End-to-end threshold refinement: the sparsity it holds, the mask it computes, and the KL it lowers."""

import math

import pytest
import torch

from thresher.calibration.evaluate import dense_log_probs, kl_from_dense, level_thresholds, thresholds_applied
from thresher.calibration.refine import RefineConfig, refine_thresholds_end_to_end, straight_through_threshold
from thresher.calibration.statistics import collect_activation_statistics
from thresher.calibration.thresholds import CalibrationSparsity, fit_channel_thresholds
from thresher.data import load_texts, token_windows
from thresher.kernels.reference import threshold_activations

from tests.helpers import histogram_statistics


def _synthetic():
    torch.manual_seed(0)
    x = torch.randn(20000, 16) * torch.logspace(-2, 0, 16)
    y = torch.randn(20000, 48) * 0.1
    stats = histogram_statistics({"layers.0.o": (x, torch.ones_like(x), 4),
                                  "layers.0.down": (y, torch.ones_like(y), 12)})
    return stats, x, y


def test_calibration_sparsity_counts_the_activations_under_any_threshold():
    stats, x, y = _synthetic()
    sparsity = CalibrationSparsity(stats)
    torch.manual_seed(1)
    t = {"layers.0.o": torch.rand(16) * x.abs().median(0).values * 2, "layers.0.down": torch.rand(48) * 0.2}
    t["layers.0.o"][3] = 0.0  # a dense channel counts nothing
    exact = (4 * 16 * float((x.abs() <= t["layers.0.o"]).float().mean())
             + 12 * 48 * float((y.abs() <= t["layers.0.down"]).float().mean())) / (4 * 16 + 12 * 48)
    assert sparsity.of_log(sparsity.flatten(t).log()) == pytest.approx(exact, abs=0.005)


def test_one_shift_brings_any_thresholds_to_the_level():
    stats, _, _ = _synthetic()
    sparsity = CalibrationSparsity(stats)
    log_t = sparsity.flatten(level_thresholds(fit_channel_thresholds(stats, [0.3], "channel-greedy")[0], 1)).log()
    for level in (0.2, 0.45):
        assert sparsity.of_log(log_t + sparsity.shift_to_level(log_t, level)) == pytest.approx(level, abs=1e-4)


def test_straight_through_threshold_is_the_hard_threshold_with_a_gradient_to_the_thresholds():
    torch.manual_seed(2)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    t = torch.full((32,), 0.5, requires_grad=True)
    y = straight_through_threshold(0.2)(x, t)
    assert torch.equal(y, threshold_activations(x, t.detach()))
    y.float().sum().backward()
    # the surrogate mask's derivative: raising t by dt removes activations near it in proportion to sigmoid'
    soft = torch.sigmoid((x.float().abs().log() - math.log(0.5)) / 0.2)
    expected = -(x.float() * soft * (1 - soft)).sum(0) / (0.2 * 0.5)
    assert torch.allclose(t.grad, expected, rtol=1e-3, atol=1e-4)


def test_refinement_lowers_the_kl_at_the_same_sparsity(hf_model):
    model, tokenizer = hf_model
    windows = list(token_windows(load_texts(None, "calibration"), tokenizer, 128, 8 * 128))
    stats = collect_activation_statistics(model, windows)
    levels = [0.5]
    thresholds, _ = fit_channel_thresholds(stats, levels, "channel-greedy")

    def kl(table) -> float:
        ids = torch.tensor(windows)
        target = dense_log_probs(model, ids)
        with torch.no_grad(), thresholds_applied(model, level_thresholds(table, 1)):
            return float(kl_from_dense(model(ids, use_cache=False).logits, target))

    refined, summary = refine_thresholds_end_to_end(model, stats, thresholds, levels, windows,
                                                    RefineConfig())
    assert summary[0]["calibration_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert kl(refined) < 0.9 * kl(thresholds), summary
    for name, table in refined.items():
        assert torch.equal(table[0], thresholds[name][0])  # level 0 stays dense
        assert torch.equal(table[1] == 0, thresholds[name][1] == 0)  # dense channels stay dense
        assert torch.isfinite(table).all()
    assert all(p.grad is None for p in model.parameters())  # the model stays untouched
