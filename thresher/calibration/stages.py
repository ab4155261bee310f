"""What a calibration will do and how long it should take on this machine, and what each stage then cost.

Before any work, `estimate_stages` times one forward batch of the model and one SAE training step where they will
run, and prices every stage from its token counts: a token's forward at full depth is the unit, a backward costs two
forwards (TEAL, CHESS and every training recipe count the same), the residual stream stops after the SAE's layer.
`StageLog` records each stage's wall time and peak memory (GPU, and the process's host peak so far) as it ends;
they go into the manifest, so an artifact says what it cost to make.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import dataclass

import torch

from thresher.sae import SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    what: str
    seconds: float  # the estimate


def _forward_seconds_per_token(model, window: list[int], batch: int = 2) -> float:
    ids = torch.tensor([window] * batch, device=model.device)
    with torch.no_grad():
        model(ids[:, :16], use_cache=False)  # warm-up: first-call allocations and kernel selection
        started = time.perf_counter()
        model(ids, use_cache=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / ids.numel()


def _sae_step_seconds(d_in: int, d_sae: int, k: int, batch: int, device: torch.device) -> float:
    sae = SparseAutoencoder(d_in, d_sae, k, 0).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    data = torch.randn(batch, d_in, device=device)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        top = sae.pre_activations(data).topk(k, dim=-1)
        loss = (data - sae.decode_sparse(top.indices, top.values.relu())).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return min(timings)


def estimate_stages(model, window: list[int], *, calibration_tokens: int, refine_tokens: int, refined_levels: int,
                    sae=None, eval_tokens: int, eval_variants: int) -> list[Stage]:
    """The stages a calibration will run, each with an estimate from rates measured here and now (`sae`:
    `pipeline.SAEOptions` or None)."""
    per_token = _forward_seconds_per_token(model, window)
    layers = model.config.num_hidden_layers
    stages = [Stage("statistics", f"forward + backward over {calibration_tokens:,} tokens, per-channel histograms",
                    3 * calibration_tokens * per_token)]
    if refine_tokens and refined_levels:
        stages.append(Stage("refinement", f"{refined_levels} levels refined end to end over {refine_tokens:,} tokens",
                            refine_tokens * (1 + 3 * refined_levels) * per_token))
    if sae is not None:
        layer = layers // 2 if sae.layer is None else sae.layer
        residuals = sae.tokens * sae.context_views
        d_in = model.config.hidden_size
        steps = residuals // sae.training.batch_size * sae.training.epochs
        step = _sae_step_seconds(d_in, sae.training.expansion * d_in, sae.training.k, sae.training.batch_size,
                                 model.device)
        stages += [
            Stage("residual stream", f"{residuals:,} residuals after layer {layer} ({sae.context_views} views of "
                  f"{sae.tokens:,} tokens)", residuals * (layer + 1) / layers * per_token),
            Stage("SAE training", f"{steps:,} steps of {sae.training.batch_size} residuals, "
                  f"{sae.training.expansion * d_in:,} latents", steps * step),
            Stage("SAE fine-tune", f"end to end over {sae.finetune.tokens:,} tokens",
                  4 * sae.finetune.tokens * per_token),
            Stage("catalog and vectors", "feature catalog over the first view, contrastive vectors",
                  sae.tokens * 2 * step / sae.training.batch_size),
        ]
    if eval_tokens:
        stages.append(Stage("report", f"held-out perplexity and KL of {eval_variants} variants over "
                            f"{eval_tokens:,} tokens", (1 + eval_variants) * eval_tokens * per_token))
    return stages


def describe(stages: list[Stage], device: torch.device) -> str:
    lines = [f"calibration plan on {device} (estimates from rates measured here just now):"]
    lines += [f"  {s.name:<20} ~{_minutes(s.seconds):>8}  {s.what}" for s in stages]
    lines.append(f"  {'total':<20} ~{_minutes(sum(s.seconds for s in stages)):>8}")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class StageLog:
    """Wall time and peak memory of each stage, logged as it ends (`records` go into the manifest)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.records: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.monotonic()
        yield
        record = {"stage": name, "seconds": round(time.monotonic() - started, 1),
                  # ru_maxrss is in KiB on Linux: the process's peak so far, not this stage's alone
                  "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        if on_gpu:
            record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.records.append(record)
        log.info("stage %s: %.1f s, peak host memory so far %.2f GiB%s", name, record["seconds"],
                 record["peak_host_gib"], f", peak GPU memory {record['peak_gpu_gib']:.2f} GiB" if on_gpu else "")
