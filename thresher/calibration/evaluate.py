"""Perplexity and KL divergence from the dense model of each sparsity level, with thresholds applied in a plain torch
forward, and of the model with an SAE spliced in.

This is the reference the sparse kernels must match: every projection input is thresholded with
`kernels.reference.threshold_activations`, for every token (prefill included), before its matmul.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from thresher.calibration.statistics import projection_groups
from thresher.kernels.reference import dequantized, fp8_weight, threshold_activations


@dataclass
class SparsityMeter:
    """Weight reads skipped: zeroed activations times the weights each one would multiply."""

    skipped: float = 0.0
    total: float = 0.0

    @property
    def sparsity(self) -> float:
        return self.skipped / self.total if self.total else 0.0


@contextlib.contextmanager
def thresholds_applied(model, thresholds: dict[str, torch.Tensor], meter: SparsityMeter | None = None,
                       apply=threshold_activations):
    """Within the block, every projection input x of `model` is replaced by `apply(x, thresholds[name])`
    (`[in_features]`, on any device: moved to the model's once, here), by default the hard thresholding the kernels
    compute."""
    handles = []
    for index, layer in enumerate(model.model.layers):
        for group in projection_groups(model):
            projections = group.hf_modules
            t = thresholds[group.tensor_name(index)].to(model.device)
            out_features = sum(layer.get_submodule(p).out_features for p in projections)
            for position, projection in enumerate(projections):
                counts = meter is not None and position == 0

                def hook(_module, args, t=t, counts=counts, out_features=out_features):
                    x = apply(args[0], t)
                    if counts:
                        meter.skipped += float((x == 0).sum()) * out_features
                        meter.total += x.numel() * out_features
                    return (x, *args[1:])

                handles.append(layer.get_submodule(projection).register_forward_pre_hook(hook))
    try:
        yield meter
    finally:
        for handle in handles:
            handle.remove()


FP8_SCALES = ("per-tensor", "per-channel")


@contextlib.contextmanager
def fp8_weights_applied(model, scales: str = "per-channel"):
    """Within the block, every projection weight of `model` is what FP8 serving computes with: rounded to e4m3 and
    widened back, with one scale per output channel (as FP8 checkpoints hold them, and thresher's sparse kernel
    reads them) or one per tensor (as vLLM 0.26's online `--quantization fp8` makes them). The activations stay as
    they are, as in the sparse kernel's FP8 path (vLLM's dense FP8 GEMM also rounds each token's activations to FP8:
    not modelled here)."""
    originals = []
    try:
        with torch.no_grad():
            for layer in model.model.layers:
                for group in projection_groups(model):
                    for path in group.hf_modules:
                        weight = layer.get_submodule(path).weight
                        originals.append((weight, weight.data))
                        rounded = fp8_weight(weight.data, per_channel=scales == "per-channel")
                        weight.data = dequantized(*rounded).to(weight.dtype)
        yield
    finally:
        for weight, data in originals:
            weight.data = data


def dense_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token log-probabilities (fp32), without gradients: what every KL divergence here is taken from
    (the refinement, the SAE fine-tune, the eval)."""
    with torch.no_grad():
        return torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)


def kl_from_dense(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(dense || modified) in nats per token, from the modified model's logits and `dense_log_probs`."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="none").sum(dim=-1).mean()


def level_thresholds(thresholds: dict[str, torch.Tensor], level_index: int) -> dict[str, torch.Tensor]:
    return {name: table[level_index] for name, table in thresholds.items()}


@dataclass
class Fidelity:
    """How a modified model (thresholds applied, an SAE spliced in) reads held-out text."""

    perplexity: float
    kl_from_dense: float  # KL(dense || modified), nats per predicted token


@torch.no_grad()
def compare_with_dense(model, windows: list[list[int]],
                       variants: dict[object, Callable[[], contextlib.AbstractContextManager]],
                       batch_size: int = 4) -> tuple[float, dict[object, Fidelity]]:
    """The dense model's perplexity over the windows, and for each variant (a factory of a context within which the
    model is modified) its perplexity and KL divergence from the dense model, one dense forward per batch.

    Perplexity alone can improve while the modified model drifts from the dense one (a change fitted to text like
    the evaluation text can lower it); the KL says how closely it still follows the model being served.
    """
    dense_nll, count = 0.0, 0
    nll, kl = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="held-out perplexity and KL", unit="batch", leave=False):
        ids = torch.tensor(batch, device=model.device)
        targets = ids[:, 1:, None]
        dense = dense_log_probs(model, ids)[:, :-1]
        dense_nll -= float(dense.gather(-1, targets).sum())
        for key, variant in variants.items():
            with variant():
                log_probs = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            nll[key] -= float(log_probs.gather(-1, targets).sum())
            kl[key] += float(torch.nn.functional.kl_div(log_probs, dense, log_target=True, reduction="sum"))
        count += targets.numel()
    return math.exp(dense_nll / count), {key: Fidelity(math.exp(nll[key] / count), kl[key] / count)
                                         for key in variants}


@contextlib.contextmanager
def sae_spliced(model, sae, record: list | None = None):
    """Within the block, the output of decoder layer `sae.hook_layer` is replaced by the SAE's reconstruction,
    except at attention sinks, which SAEs are not trained on. With `record`, each forward appends
    `(residuals, reconstructions, not_sink)` of that layer (flattened over tokens) to it."""
    from thresher.calibration.sae_training import attention_sink_mask

    def splice(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        flat = hidden.reshape(-1, hidden.shape[-1])
        residuals = flat.float()
        keep = attention_sink_mask(residuals)
        with torch.autocast(residuals.device.type, enabled=False):  # the SAE in fp32 even when the model is not
            reconstruction = sae(residuals)
        if record is not None:
            record.append((residuals, reconstruction, keep))
        spliced = torch.where(keep[:, None], reconstruction.to(flat.dtype), flat).reshape(hidden.shape)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    handle = model.model.layers[sae.hook_layer].register_forward_hook(splice)
    try:
        yield
    finally:
        handle.remove()
