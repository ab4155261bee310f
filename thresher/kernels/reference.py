"""The ground truth every sparse kernel is tested against.

An activation is kept when its magnitude is strictly above its channel's threshold, so a threshold of 0 keeps
every non-zero activation and gives exactly the dense result.
"""

from __future__ import annotations

import torch


def select_thresholds(thresholds: torch.Tensor, level_index: torch.Tensor | int) -> torch.Tensor:
    """Per-row threshold vectors from a `[levels, in_features]` table and a level index (scalar or per row)."""
    if thresholds.dim() == 1:
        return thresholds
    return thresholds[level_index]


def threshold_activations(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """x with every activation whose magnitude is at most its channel's threshold set to zero.

    `thresholds` is `[in_features]` (one level for all rows) or broadcastable to `x` (one vector per row).
    """
    # compared in fp32, as the kernels do: a threshold rounded to bf16 would move the cut
    keep = x.abs().float() > thresholds.float()
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def sparse_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    thresholds: torch.Tensor,
    level_index: torch.Tensor | int = 0,
) -> torch.Tensor:
    """y = threshold(x) @ W^T, for x `[rows, in]`, W `[out, in]`, thresholds `[in]` or `[levels, in]`.

    With a level table, `level_index` picks a level for all rows (int) or one per row (`[rows]` int tensor).
    """
    t = select_thresholds(thresholds, level_index)
    return torch.nn.functional.linear(threshold_activations(x, t), weight)
