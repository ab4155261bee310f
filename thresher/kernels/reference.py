"""The ground truth every sparse kernel is tested against.

An activation is kept when its magnitude is strictly above its channel's threshold, so a threshold of 0 keeps
every non-zero activation and gives exactly the dense result.
"""

from __future__ import annotations

import torch

# What makes a projection's input from the previous projection's fp32 output (the Triton versions compute it inside
# the sparse kernel's compaction, see triton_producers): nothing (x is given), SiLU-and-multiply (before down), or
# the residual add and RMSNorm (before q/k/v and gate/up).
PLAIN, SILU_MUL, ADD_RMS_NORM = 0, 1, 2


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


def fp8_weight(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(W in float8_e4m3fn, fp32 scales `[out]`, or one) as vLLM's FP8 linear layers hold it: W ~ W8 * scale, each
    output channel (or the whole tensor) scaled so that its largest magnitude is e4m3's largest, 448."""
    largest = weight.abs().float().amax(dim=1) if per_channel else weight.abs().float().amax().reshape(1)
    scale = largest.clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    quantized = (weight.float() / (scale[:, None] if per_channel else scale)).to(torch.float8_e4m3fn)
    return quantized, scale


def fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in float8_e4m3fn, fp32 scales `[rows, 1]`): vLLM's dynamic per-token FP8 quantization of activations, as
    its `QuantFP8` computes it in torch (each row scaled so that its largest magnitude is 448, the scale at least
    1 / (448 * 512))."""
    largest = torch.finfo(torch.float8_e4m3fn).max
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / largest).clamp(min=1.0 / (largest * 512.0))
    return (x.float() * scale.reciprocal()).clamp(-largest, largest).to(torch.float8_e4m3fn), scale


def dequantized(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weights an FP8 weight `[out, in]` and its scales (`[out]` or one) stand for."""
    return weight.float() * scale.float().reshape(-1, 1)


def silu_mul_reference(gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SiLU-and-multiply of a projection's output `[rows, 2K]` (gate, then up), rounded to `dtype` first, as the
    producer kernels compute it: silu(g) * u in fp32, rounded once."""
    gate, up = gate_up.to(dtype).float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(dtype)


def add_rms_norm_reference(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) for h = y rounded to the residual's dtype, plus the residual: vLLM's fused add and
    RMSNorm on a projection output that was cast first."""
    dtype = residual.dtype
    h = y.to(dtype).float() + residual.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)).to(dtype)
    return (normed.float() * weight.float()).to(dtype), h.to(dtype)


def produce_reference(producer: int, source: torch.Tensor, dtype: torch.dtype, residual: torch.Tensor | None = None,
                      norm_weight: torch.Tensor | None = None,
                      eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, the new residual under ADD_RMS_NORM, else None) made from `source` by `producer`."""
    if producer == SILU_MUL:
        return silu_mul_reference(source, dtype), None
    if producer == ADD_RMS_NORM:
        return add_rms_norm_reference(source, residual, norm_weight, eps)
    return source, None
