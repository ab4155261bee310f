"""End-to-end refinement of fitted thresholds: each level's per-channel thresholds moved down the KL divergence
between the dense model's next-token distribution and the thresholded model's.

The greedy fit (`thresholds.py`) prices every activation by a diagonal Fisher estimate on the dense model, one
channel at a time. It cannot see that zeroing in early layers changes what later layers receive, nor how the errors
of many channels add up. Starting from the greedy thresholds, this step descends the KL divergence over the
thresholds alone, one log-offset per channel. The forward pass keeps the hard mask, so what is optimised is what
the kernels compute; the gradient is a sigmoid's in log|x| (a straight-through estimator). After every step one
global log-shift brings the level's sparsity on the calibration histograms back to the level: the budget moves
between channels, but never grows or shrinks. Channels the greedy fit kept dense stay dense.

On the embedded model (held-out 16k tokens, dense 25.29; the default 20 steps of one 512-token window,
2 min for the four default levels on 2 CPU cores): 40% +10.6% -> +7.8%, 50% +41.1% -> +27.2%, 60% +153% -> +78%,
and the measured sparsity of the 60% level 62.4% -> 60.5%. (25% went from +0.3% to +1.1% with a fixed temperature
of 0.2, hence `min_level`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from thresher.calibration.evaluate import dense_log_probs, kl_from_dense, thresholds_applied
from thresher.calibration.statistics import frozen_parameters
from thresher.calibration.thresholds import CalibrationSparsity


@dataclass
class RefineConfig:
    """The refinement's budget and schedule (how each default was chosen: bench/RESULTS.md, "Calibration
    defaults")."""

    tokens: int = 10240  # 0 skips the refinement
    windows_per_step: int = 1
    learning_rate: float = 0.025  # in natural-log units of the thresholds
    # width of the sigmoid surrogate in log|x|, annealed geometrically from `temperature` at the first step to
    # `final_temperature` at the last
    temperature: float = 0.4
    final_temperature: float = 0.1
    # levels under this stay as fitted: low levels are already close to dense, and refining them cost quality
    min_level: float = 0.3


def straight_through_threshold(temperature: float):
    """x thresholded by t (hard, exactly `threshold_activations` forward), with a gradient to t from the surrogate
    mask sigmoid((log|x| - log t) / temperature)."""

    def apply(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        magnitude = x.abs().float()
        hard = (magnitude > t).float()
        soft = torch.sigmoid((magnitude.clamp_min(1e-30).log() - t.clamp_min(1e-30).log()) / temperature)
        return x * (hard + soft - soft.detach()).to(x.dtype)

    return apply


class _LevelThresholds(torch.nn.Module):
    """One level's thresholds as learnable log-offsets on the greedy fit (dense channels fixed at 0)."""

    def __init__(self, sparsity: CalibrationSparsity, thresholds: dict[str, torch.Tensor]):
        super().__init__()
        self.sparsity = sparsity
        start = sparsity.flatten(thresholds).float()
        self.register_buffer("learnable", start > 0)
        self.register_buffer("log_start", start.clamp_min(1e-30).log())
        self.offsets = torch.nn.Parameter(torch.zeros(int(self.learnable.sum())))

    def log_thresholds(self) -> torch.Tensor:
        full = torch.full_like(self.log_start, -float("inf"))
        return full.masked_scatter(self.learnable, self.log_start[self.learnable] + self.offsets)

    def thresholds(self) -> dict[str, torch.Tensor]:
        flat = self.log_thresholds().exp()
        return {name: flat[rows] for name, rows in self.sparsity.slices.items()}

    @torch.no_grad()
    def hold_level(self, level: float) -> None:
        self.offsets += self.sparsity.shift_to_level(self.log_thresholds().double(), level)


def refine_thresholds_end_to_end(model, stats, thresholds: dict[str, torch.Tensor], levels: list[float],
                                 windows: list[list[int]], config: RefineConfig, bf16: bool = False):
    """Refined copies of `thresholds` (`[1 + len(levels), in_features]` per tensor; row 0, dense, and the levels under
    `config.min_level` unchanged), and per refined level its sparsity on the calibration histograms and the KL
    divergence of the first and the last step. All levels share each step's dense forward."""
    sparsity = CalibrationSparsity(stats)
    refined_indices = [index for index, level in enumerate(levels, start=1) if level >= config.min_level]
    levels = [levels[index - 1] for index in refined_indices]
    per_level = [_LevelThresholds(sparsity, {name: table[index] for name, table in thresholds.items()})
                 for index in refined_indices]
    optimizers = [torch.optim.Adam(learned.parameters(), lr=config.learning_rate) for learned in per_level]
    steps = [windows[i : i + config.windows_per_step] for i in range(0, len(windows), config.windows_per_step)]
    history = [[] for _ in levels]
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)
    with frozen_parameters(model), tqdm(steps, desc="threshold refinement", unit="step", leave=False) as bar:
        for step, batch in enumerate(bar):
            ids = torch.tensor(batch, device=model.device)
            progress = step / max(len(steps) - 1, 1)
            apply = straight_through_threshold(
                config.temperature * (config.final_temperature / config.temperature) ** progress)
            with autocast:
                target = dense_log_probs(model, ids)
            for index, (level, learned, optimizer) in enumerate(zip(levels, per_level, optimizers)):
                with thresholds_applied(model, learned.thresholds(), apply=apply), autocast:
                    kl = kl_from_dense(model(ids, use_cache=False).logits, target)
                optimizer.zero_grad(set_to_none=True)
                kl.backward()
                optimizer.step()
                learned.hold_level(level)
                history[index].append(kl.item())
            bar.set_postfix(kl=" ".join(f"{h[-1]:.3f}" for h in history))
    refined = {name: table.clone() for name, table in thresholds.items()}
    with torch.no_grad():
        for index, learned in zip(refined_indices, per_level):
            for name, row in learned.thresholds().items():
                refined[name][index] = row.to(refined[name].dtype)
    summary = [{"level": level, "calibration_sparsity": sparsity.of_log(learned.log_thresholds().detach()),
                "kl_first": h[0], "kl_last": h[-1]} for level, learned, h in zip(levels, per_level, history) if h]
    return refined, summary
