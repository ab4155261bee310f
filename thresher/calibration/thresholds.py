"""Fitting per-channel thresholds for several sparsity levels from activation histograms.

Sparsity is counted in weight reads: zeroing input channel c of a projection group skips the `out_features`
weights of column c, so a level of 40% means 40% of all projection weights go unread (at batch 1).

- `channel-greedy`: every channel of every tensor gets its own cut-off. The budget goes greedily to the
  activations that are cheapest to zero per weight skipped (cost from `statistics.py`, in loss units, so tensors and
  layers compare directly). The cost of zeroing an activation x of channel c is taken as a_c * x^2, where the
  channel's sensitivity a_c is its Fisher cost over its sum of x^2 across all bins: the per-bin Fisher sums are
  noisy where a bin holds few activations, and cut-offs drawn to chance low-cost bins cost perplexity (measured on
  the embedded model, 8k held-out tokens: +0.4% instead of +2.7% at 25%, +13.0% instead of +13.1% at 40%,
  +42% instead of +39% at 50%). For a price `lam`, each channel independently takes the cut-off minimising
  cost - lam * weights_skipped; `lam` is then searched until the level's budget is met. This is the Lagrangian
  form of the greedy knapsack, and it keeps channels with outsized activations or outsized influence dense.
- `teal-uniform`: TEAL's baseline, one magnitude threshold per tensor with the same sparsity in every tensor.
"""

from __future__ import annotations

import math

import torch

from thresher.calibration.statistics import (BINS_PER_OCTAVE, LOWEST_OCTAVE, NUM_BINS, ActivationStatistics,
                                             ChannelHistogram, bin_lower_edges)

METHODS = ("channel-greedy", "teal-uniform")


def pooled_channel_costs(counts: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Per-bin zeroing costs `[channels, bins]` re-estimated as each channel's sensitivity times the bin's sum of x^2
    (bin centres), so the channel's total cost is kept and only its spread over bins changes."""
    edges = bin_lower_edges()
    centres = edges * 2 ** (0.5 / BINS_PER_OCTAVE)
    centres[0] = edges[1] / 2
    squares = counts * centres.square()
    sensitivity = costs.sum(1, keepdim=True) / squares.sum(1, keepdim=True).clamp(min=1e-300)
    return sensitivity * squares


def _stacked_counts(stats: ActivationStatistics):
    """All channels of all tensors as rows: per-bin counts, cumulative counts of bins [0, k), and weights per row."""
    names = list(stats.histograms)
    hists = [stats.histograms[n] for n in names]
    counts = torch.cat([h.counts for h in hists])
    zero = torch.zeros(counts.shape[0], 1, dtype=torch.float64)
    # column k: what zeroing bins [0, k) skips; the last bin is never zeroed.
    cum_counts = torch.cat([zero, counts.cumsum(1)[:, :-1]], dim=1)
    row_weights = torch.cat([torch.full((h.in_features,), float(h.out_features), dtype=torch.float64) for h in hists])
    return names, hists, counts, cum_counts, row_weights


def _stacked(stats: ActivationStatistics):
    """`_stacked_counts` with, per row, the cumulative (pooled) cost of zeroing bins [0, k)."""
    names, hists, counts, cum_counts, row_weights = _stacked_counts(stats)
    costs = pooled_channel_costs(counts, torch.cat([h.costs for h in hists]))
    cum_costs = torch.cat([torch.zeros(counts.shape[0], 1, dtype=torch.float64), costs.cumsum(1)[:, :-1]], dim=1)
    return names, hists, cum_counts, cum_costs, row_weights


def _weighted_sparsity(cutoffs: torch.Tensor, cum_counts: torch.Tensor, row_weights: torch.Tensor, tokens: int):
    skipped = cum_counts.gather(1, cutoffs[:, None]).squeeze(1)
    return float((skipped * row_weights).sum() / (row_weights.sum() * tokens))


def _greedy_cutoffs(level: float, cum_counts, cum_costs, row_weights, tokens: int) -> torch.Tensor:
    """Per-row cut-off bins that meet `level` (weighted) at the least total cost."""
    saved = cum_counts * row_weights[:, None]

    def cutoffs_at(price: float) -> torch.Tensor:
        return (cum_costs - price * saved).argmin(dim=1)

    low, high = 1e-30, 1.0
    while _weighted_sparsity(cutoffs_at(high), cum_counts, row_weights, tokens) < level and high < 1e30:
        high *= 10.0
    for _ in range(100):  # bisection in log space
        mid = (low * high) ** 0.5
        if _weighted_sparsity(cutoffs_at(mid), cum_counts, row_weights, tokens) < level:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-6:
            break
    return cutoffs_at(high)


def _uniform_thresholds(level: float, hists, cum_counts, tokens: int, edges: torch.Tensor) -> torch.Tensor:
    """One threshold per tensor zeroing `level` of its activations, interpolated log-linearly inside the bin."""
    thresholds, row = [], 0
    target = torch.tensor([level], dtype=torch.float64)
    for h in hists:
        zeroed = cum_counts[row : row + h.in_features].sum(0) / (tokens * h.in_features)
        k = int(torch.searchsorted(zeroed, target).clamp(1, zeroed.numel() - 1))  # zeroed[k-1] < level <= zeroed[k]
        within = float((level - zeroed[k - 1]) / (zeroed[k] - zeroed[k - 1]).clamp(min=1e-12))
        low = edges[k - 1] if k > 1 else edges[k] / 2 ** (1 / BINS_PER_OCTAVE)
        value = float(low * (edges[k] / low) ** min(max(within, 0.0), 1.0))
        thresholds.append(torch.full((h.in_features,), value, dtype=torch.float64))
        row += h.in_features
    return torch.cat(thresholds)


class CalibrationSparsity:
    """The weighted sparsity any thresholds reach on the calibration histograms.

    Thresholds are one flat vector over all tensors' channels (in `names` order, `slices` per tensor). Activations
    under a threshold that falls inside a bin are counted log-linearly, so the sparsity moves smoothly with the
    thresholds; at bin edges it equals what the greedy fit counts.
    """

    def __init__(self, stats: ActivationStatistics):
        self.names, hists, counts, cum_counts, row_weights = _stacked_counts(stats)
        self.slices, row = {}, 0
        for name, h in zip(self.names, hists):
            self.slices[name] = slice(row, row + h.in_features)
            row += h.in_features
        self._below = cum_counts / stats.tokens  # column k: fraction of the channel's activations in bins [0, k)
        self._in_bin = counts / stats.tokens
        self._weights = row_weights / row_weights.sum()

    def flatten(self, thresholds: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([thresholds[name].double() for name in self.names])

    def of_log(self, log_thresholds: torch.Tensor) -> float:
        """Sparsity at thresholds given by their natural logs (-inf: a dense channel)."""
        position = (log_thresholds.double() / math.log(2) - LOWEST_OCTAVE) * BINS_PER_OCTAVE
        position = position.nan_to_num(neginf=0.0).clamp(0, NUM_BINS - 1)
        k = position.floor().long()[:, None]
        below = self._below.gather(1, k).squeeze(1) + (position - k.squeeze(1)) * self._in_bin.gather(1, k).squeeze(1)
        return float((below * self._weights).sum())

    def shift_to_level(self, log_thresholds: torch.Tensor, level: float) -> float:
        """The one log-shift, added to every finite threshold, that brings the sparsity to `level`."""
        low, high = -4.0, 4.0
        for _ in range(40):
            middle = (low + high) / 2
            if self.of_log(log_thresholds + middle) < level:
                low = middle
            else:
                high = middle
        return high


def fit_channel_thresholds(
    stats: ActivationStatistics, levels: list[float], method: str = "channel-greedy"
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Thresholds `[1 + len(levels), in_features]` per tensor (row 0 is level 0: all zeros, the dense model),
    and the weighted sparsity each level reaches on the calibration data."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    names, hists, cum_counts, cum_costs, row_weights = _stacked(stats)
    edges = bin_lower_edges()
    per_level = [torch.zeros(cum_counts.shape[0], dtype=torch.float64)]
    reached = []
    for level in levels:
        if method == "channel-greedy":
            cutoffs = _greedy_cutoffs(level, cum_counts, cum_costs, row_weights, stats.tokens)
            per_level.append(edges[cutoffs])
            reached.append(_weighted_sparsity(cutoffs, cum_counts, row_weights, stats.tokens))
        else:
            per_level.append(_uniform_thresholds(level, hists, cum_counts, stats.tokens, edges))
            reached.append(level)
    table = torch.stack(per_level).float()
    thresholds, row = {}, 0
    for name, h in zip(names, hists):
        thresholds[name] = table[:, row : row + h.in_features].contiguous()
        row += h.in_features
    return thresholds, reached


def uniform_thresholds_from_samples(samples: dict[str, torch.Tensor], widths: dict[str, int],
                                   levels: list[float]) -> dict[str, torch.Tensor]:
    """TEAL-uniform thresholds `[1 + len(levels), widths[name]]` from samples of each tensor's activations (its
    channels pooled), through the same fit as `teal-uniform` calibration: for models that exist only in an engine,
    whose decode inputs are all there is to fit on (the decode benchmark's dummy weights).

    Each tensor's samples are fitted as fractions of their largest magnitude, and its thresholds scaled back: the fit
    commutes with scaling, and the histograms resolve magnitudes down to 2^-16 only, which the attention and MLP
    outputs of dummy weights (~1e-3 at most) fall below."""
    count = min(len(values) for values in samples.values())  # every tensor weighs the same in the fit
    stats = ActivationStatistics(tokens=count)
    scales = {}
    for name, values in samples.items():
        values = values[:count].double().abs()
        scales[name] = float(values.max()) or 1.0
        stats.histograms[name] = ChannelHistogram.empty(1, 1)
        stats.histograms[name].add((values / scales[name]).reshape(-1, 1), None)
    pooled, _ = fit_channel_thresholds(stats, levels, "teal-uniform")
    return {name: (table * scales[name]).expand(-1, widths[name]).contiguous() for name, table in pooled.items()}
