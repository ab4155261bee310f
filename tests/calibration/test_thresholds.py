"""Threshold fitting on synthetic activations with known distributions."""

import math

import pytest
import torch

from thresher.calibration.thresholds import fit_channel_thresholds, pooled_channel_costs

from tests.helpers import histogram_statistics


def _zeroed_fraction(x: torch.Tensor, t: torch.Tensor) -> float:
    return float((x.abs() <= t).float().mean())


def test_uniform_thresholds_are_the_gaussian_quantiles():
    torch.manual_seed(0)
    sigma = 0.3
    x = torch.randn(20000, 64) * sigma
    stats = histogram_statistics({"layers.0.o": (x, torch.ones_like(x), 8)})
    levels = [0.25, 0.5, 0.75]
    thresholds, reached = fit_channel_thresholds(stats, levels, "teal-uniform")
    table = thresholds["layers.0.o"]
    assert table.shape == (4, 64)
    assert torch.equal(table[0], torch.zeros(64))
    for index, level in enumerate(levels, start=1):
        # |x| <= t with probability level  <=>  t = sigma * Phi^-1((1 + level) / 2)
        expected = sigma * math.sqrt(2) * torch.erfinv(torch.tensor((1 + level) / 2 * 2 - 1)).item()
        assert table[index].unique().numel() == 1, "teal-uniform uses one threshold per tensor"
        assert table[index, 0].item() == pytest.approx(expected, rel=0.02)
        assert _zeroed_fraction(x, table[index]) == pytest.approx(level, abs=0.01)
    assert reached == levels


def test_greedy_meets_the_global_budget_in_weight_reads():
    torch.manual_seed(1)
    tokens = 8000
    cheap, dear = torch.randn(tokens, 32), torch.randn(tokens, 32)
    stats = histogram_statistics(
        {
            # same activations, but zeroing the second tensor costs 100x more per activation
            "layers.0.gate_up": (cheap, torch.full_like(cheap, 0.1), 48),
            "layers.0.down": (dear, torch.full_like(dear, 1.0), 16),
        }
    )
    for level in (0.2, 0.4, 0.6):
        thresholds, reached = fit_channel_thresholds(stats, [level], "channel-greedy")
        skipped = 48 * 32 * _zeroed_fraction(cheap, thresholds["layers.0.gate_up"][1]) + 16 * 32 * _zeroed_fraction(
            dear, thresholds["layers.0.down"][1]
        )
        assert skipped / (48 * 32 + 16 * 32) == pytest.approx(level, abs=0.01)
        assert reached[0] == pytest.approx(level, abs=0.005)
        # the budget goes to the cheap tensor first
        assert _zeroed_fraction(cheap, thresholds["layers.0.gate_up"][1]) > _zeroed_fraction(
            dear, thresholds["layers.0.down"][1]
        )


def test_greedy_keeps_costly_channels_nearly_dense():
    torch.manual_seed(2)
    x = torch.randn(5000, 16)
    g = torch.ones_like(x)
    g[:, 3] = 1000.0  # channel 3 drives the loss: only its tiniest activations are worth zeroing
    thresholds, _ = fit_channel_thresholds(histogram_statistics({"layers.0.qkv": (x, g, 4)}), [0.5], "channel-greedy")
    zeroed = (x.abs() <= thresholds["layers.0.qkv"][1]).float().mean(0)
    assert zeroed[3] < 0.02  # only its near-zero activations
    assert (zeroed[torch.arange(16) != 3] > 0.5).all()


def test_unknown_method_is_rejected():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        fit_channel_thresholds(histogram_statistics({"layers.0.o": (x, x, 2)}), [0.5], "magic")


def test_pooled_costs_keep_each_channels_total_and_grow_with_magnitude():
    torch.manual_seed(3)
    x = torch.randn(4000, 8)
    g = torch.randn(4000, 8) * torch.linspace(0.1, 10, 8)  # channels of different sensitivity, noisy per bin
    h = histogram_statistics({"layers.0.o": (x, g, 4)}).histograms["layers.0.o"]
    pooled = pooled_channel_costs(h.counts, h.costs)
    torch.testing.assert_close(pooled.sum(1), h.costs.sum(1))
    per_activation = pooled / h.counts.clamp(min=1)
    occupied = h.counts[0] > 0
    assert (per_activation[0, occupied].diff() > 0).all(), "a larger magnitude costs more to zero"


def test_uniform_thresholds_from_samples_hit_each_level():
    from thresher.calibration.thresholds import uniform_thresholds_from_samples

    torch.manual_seed(0)
    # down's magnitudes are what dummy weights make: all under the histograms' lowest bin edge (2^-16)
    samples = {"layers.0.qkv": torch.randn(50_000).abs(), "layers.0.o": 3 * torch.randn(50_000).abs(),
               "layers.0.down": 1e-6 * torch.randn(50_000).abs()}
    fitted = uniform_thresholds_from_samples(samples, {"layers.0.qkv": 8, "layers.0.o": 4, "layers.0.down": 4},
                                             [0.25, 0.5])
    assert fitted["layers.0.qkv"].shape == (3, 8) and fitted["layers.0.down"].shape == (3, 4)
    for name, values in samples.items():
        table = fitted[name]
        assert (table[0] == 0).all() and (table == table[:, :1]).all()
        for row, level in ((1, 0.25), (2, 0.5)):
            assert float((values < table[row, 0]).float().mean()) == pytest.approx(level, abs=0.01)
