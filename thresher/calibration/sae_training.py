"""Training a TopK SAE on the residual stream after one decoder layer.

Residuals are gathered by a forward pass that stops after layer L, into a tensor preallocated for the token budget
(bounded memory: budget x hidden floats). Training follows the TopK recipe of Gao et al. (2024): decoder rows
kept at unit norm (with the gradient component along each row removed), the decoder bias initialised at the
geometric median of the data, and an auxiliary loss (AuxK) that lets dead latents model the residual error so they
come back to life. Inputs are scaled to unit mean squared norm per dimension while training and the scale is
folded back into the weights at the end, so the saved SAE reads raw residuals.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from thresher.sae import SparseAutoencoder

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class Residuals:
    """Residual-stream vectors after layer `layer`, with the token ids and window they came from."""

    layer: int
    vectors: torch.Tensor  # [tokens, hidden] float32
    token_ids: torch.Tensor  # [tokens] int64
    window_length: int  # vectors are whole windows, row-major: token t sits in window t // window_length


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run in hardware here: CUDA, or a CPU with AVX512-BF16 or AMX (oneDNN uses them)."""
    if device.type == "cuda":
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return device.type == "cpu" and any(check is not None and check() for check in checks)


@torch.no_grad()
def collect_residuals(model, windows: list[list[int]], layer: int, batch_size: int = 8,
                      desc: str = "residual stream", bf16: bool = False) -> Residuals:
    """The output of decoder layer `layer` for every token of the windows (the forward stops after that layer).

    With `bf16`, the forward runs under bfloat16 autocast: 3x faster on a CPU with AMX (the embedded model, 16k
    tokens: 2.7 s instead of 8.1 s), with residuals 0.5% off in norm (median), which is enough to train on; held-out
    measurements keep full precision.
    """
    layers = model.model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has decoder layers 0..{len(layers) - 1}")
    window_length = len(windows[0])
    total = len(windows) * window_length
    vectors = torch.empty(total, model.config.hidden_size)
    captured = []

    def capture(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden.reshape(-1, hidden.shape[-1]).float())
        raise _StopForward

    handle = layers[layer].register_forward_hook(capture)
    filled = 0
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
            try:
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                    model.model(torch.tensor(windows[start : start + batch_size], device=model.device))
            except _StopForward:
                pass
            block = captured.pop()
            vectors[filled : filled + block.shape[0]] = block
            filled += block.shape[0]
    finally:
        handle.remove()
    token_ids = torch.tensor([t for window in windows for t in window], dtype=torch.long)
    return Residuals(layer, vectors, token_ids, window_length)


def attention_sink_mask(vectors: torch.Tensor, factor: float = 8.0) -> torch.Tensor:
    """True for ordinary tokens; False for attention sinks, whose residual norm is ~100x the median.

    Sinks (the first token of a sequence, and a few others) would dominate the variance an SAE is trained and
    measured on; SAEs leave them out, as they leave out BOS.
    """
    norms = vectors.norm(dim=1)
    return norms <= factor * norms.median()


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance (robust to outlier tokens)."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-6)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


@dataclass
class TrainingConfig:
    """The TopK SAE's shape and training budget (how each default was chosen: bench/RESULTS.md, "Calibration
    defaults")."""

    expansion: int = 8
    k: int = 32
    epochs: int = 3
    batch_size: int = 256  # small batches: many updates from the ~260k tokens a CPU can gather in minutes
    learning_rate: float = 1e-3
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 200_000  # a latent silent this long counts as dead for AuxK
    seed: int = 0


def _auxk_loss(sae: SparseAutoencoder, pre: torch.Tensor, error: torch.Tensor, dead: torch.Tensor,
               aux_k: int) -> torch.Tensor:
    """How well the top `aux_k` dead latents reconstruct what the live ones missed (normalised by the error)."""
    dead_latents = dead.nonzero().squeeze(1)
    if len(dead_latents) == 0:
        return pre.new_zeros(())
    top = pre[:, dead_latents].topk(min(aux_k, len(dead_latents)), dim=-1)
    reconstruction = sae.decode_sparse(dead_latents[top.indices], top.values.relu()) - sae.b_dec
    return (reconstruction - error).square().sum(dim=-1).mean() / error.square().sum(dim=-1).mean().clamp_min(1e-8)


def unit_norm_decoder_step(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer step that keeps decoder rows at unit norm: the gradient component that would only change a row's
    norm is dropped first, and the rows are renormalised after."""
    with torch.no_grad():
        rows = sae.W_dec
        rows.grad -= (rows.grad * rows).sum(dim=1, keepdim=True) * rows
    optimizer.step()
    sae.normalize_decoder()


def train_topk_sae(residuals: Residuals, config: TrainingConfig, model_name: str = "",
                   device: torch.device | str = "cpu", rows: torch.Tensor | None = None) -> SparseAutoencoder:
    """Fit a TopK SAE to the rows `rows` (default: all) of `residuals.vectors`, which stay where they are and are
    never copied whole: each batch is gathered and goes to `device`, where the SAE trains. Returns it on `device`, in
    raw residual units."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    data = residuals.vectors
    rows = torch.arange(len(data)) if rows is None else rows
    d_in = data.shape[1]
    # per-row sums in chunks, then one mean: the same numbers as over a copy of the kept rows
    row_squares = torch.cat([data[rows[start : start + 65536]].square().sum(dim=1)
                             for start in range(0, len(rows), 65536)])
    scale = float(row_squares.mean().sqrt()) / math.sqrt(d_in)
    sae = SparseAutoencoder(d_in, config.expansion * d_in, config.k, residuals.layer, "topk", model_name).to(device)
    subsample = data[rows[torch.randperm(len(rows), generator=generator)[:8192]]].to(device) / scale
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(subsample))
    # fused: one kernel per step instead of a dozen passes over the 5M parameters (a step of the default run's SAE on
    # this project's 2-core CPU: ~37 -> ~28 ms)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), eps=6.25e-10,
                                 fused=True)
    steps_per_epoch = max(1, len(rows) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    # linear decay over the last fifth, as in the TopK recipe
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, 5.0 * (total_steps - step) / total_steps))
    tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    progress = tqdm(total=total_steps, desc=f"SAE layer {residuals.layer}", unit="step", leave=False)
    for _epoch in range(config.epochs):
        order = rows[torch.randperm(len(rows), generator=generator)]
        for step in range(steps_per_epoch):
            batch = data[order[step * config.batch_size : (step + 1) * config.batch_size]].to(device) / scale
            pre = sae.pre_activations(batch)
            top = pre.topk(config.k, dim=-1)
            values = top.values.relu()
            error = batch - sae.decode_sparse(top.indices, values)
            mse = error.square().sum(dim=-1).mean() / (batch - batch.mean(dim=0)).square().sum(dim=-1).mean()
            fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
            fired[top.indices[values > 0]] = True
            tokens_since_fired += len(batch)
            tokens_since_fired[fired] = 0
            dead = tokens_since_fired > config.dead_after_tokens
            loss = mse + config.aux_coefficient * _auxk_loss(sae, pre, error.detach(), dead, config.aux_k)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            unit_norm_decoder_step(sae, optimizer)
            schedule.step()
            progress.update()
            progress.set_postfix(fvu=f"{mse.item():.3f}", dead=int(dead.sum()))
    progress.close()
    with torch.no_grad():
        sae.b_enc.mul_(scale)
        sae.b_dec.mul_(scale)
    return sae


@dataclass
class SAEQuality:
    fvu: float  # fraction of variance unexplained on held-out residuals
    l0: float  # mean active latents per token
    silent_fraction: float  # latents that never fire on these residuals
    density: torch.Tensor  # [d_sae] fraction of tokens each latent fires on


@torch.no_grad()
def measure_sae(sae: SparseAutoencoder, vectors: torch.Tensor, batch_size: int = 4096) -> SAEQuality:
    squared_error, fired, active = 0.0, torch.zeros(sae.d_sae), 0.0
    for start in range(0, len(vectors), batch_size):
        batch = vectors[start : start + batch_size].to(sae.W_enc.device)
        codes = sae.encode(batch)
        squared_error += float((sae.decode(codes) - batch).square().sum())
        on = codes > 0
        fired += on.sum(dim=0).cpu()
        active += float(on.sum())
    variance = float((vectors - vectors.mean(dim=0)).square().sum())
    density = fired / len(vectors)
    return SAEQuality(fvu=squared_error / variance, l0=active / len(vectors),
                      silent_fraction=float((fired == 0).float().mean()), density=density)
