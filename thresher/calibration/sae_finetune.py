"""End-to-end fine-tuning of a trained SAE through the frozen model.

An SAE trained on reconstruction alone spends its capacity on the residual directions with the most variance, which
are not the ones the later layers read most: splicing its reconstruction into the model costs far more perplexity
than its fraction of variance unexplained suggests. A short fine-tune on the KL divergence between the dense model's
next-token distribution and the spliced model's (after Braun et al. 2024, "e2e SAEs", and Karvonen's KL fine-tuning
of trained SAEs), with the reconstruction loss kept as a second term so the SAE still reconstructs what it reads,
moves the SAE toward the directions that matter downstream. Only the SAE's parameters change; decoder rows stay at
unit norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from thresher.calibration.evaluate import dense_log_probs, kl_from_dense, sae_spliced
from thresher.calibration.sae_training import unit_norm_decoder_step
from thresher.calibration.statistics import frozen_parameters
from thresher.sae import SparseAutoencoder


@dataclass
class FineTuneConfig:
    """The end-to-end fine-tune's budget (how it was chosen: bench/RESULTS.md, "Calibration defaults")."""

    tokens: int = 65536  # 0 skips the fine-tune
    windows_per_step: int = 2
    learning_rate: float = 1e-4
    # weight of the reconstruction term (fraction of variance unexplained) beside the KL divergence in nats per token
    reconstruction_weight: float = 1.0


def _fraction_unexplained(residuals: torch.Tensor, reconstructions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = residuals[keep]
    return (reconstructions[keep] - kept).square().sum() / (kept - kept.mean(dim=0)).square().sum()


def finetune_sae_end_to_end(model, sae: SparseAutoencoder, windows: list[list[int]], config: FineTuneConfig,
                            bf16: bool = False) -> dict:
    """Fine-tune `sae` (on the model's device) in place on `windows` (token-id lists of equal length); returns the
    first and last steps' KL divergence and fraction of variance unexplained. With `bf16`, the model's forward and
    backward run under bfloat16 autocast; the SAE itself stays in fp32. On this project's CPU (AMX), continuing the
    default SAE's fine-tune by 32 steps gave the same held-out spliced perplexity as in fp32 (+22.1%) at 2.2 s/step
    instead of ~3."""
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.learning_rate, fused=True)
    steps = [windows[i : i + config.windows_per_step] for i in range(0, len(windows), config.windows_per_step)]
    history = []
    progress = tqdm(steps, desc=f"SAE layer {sae.hook_layer}, end-to-end", unit="step", leave=False)
    with frozen_parameters(model), progress as bar:
        for batch in bar:
            ids = torch.tensor(batch, device=model.device)
            recorded = []
            with autocast:
                target = dense_log_probs(model, ids)
                with sae_spliced(model, sae, recorded):
                    kl = kl_from_dense(model(ids, use_cache=False).logits, target)
            fvu = _fraction_unexplained(*recorded[0])
            loss = kl + config.reconstruction_weight * fvu
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            unit_norm_decoder_step(sae, optimizer)
            history.append((kl.item(), fvu.item()))
            bar.set_postfix(kl=f"{history[-1][0]:.3f}", fvu=f"{history[-1][1]:.3f}")
    if not history:
        return {}
    return {"steps": len(history), "kl_first": history[0][0], "kl_last": history[-1][0],
            "fvu_first": history[0][1], "fvu_last": history[-1][1]}
