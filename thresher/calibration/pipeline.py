"""`thresher calibrate` and `thresher eval` as functions: model + text in, artifact and report out."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thresher import data
from thresher.artifact import Artifact, load_artifact, model_identity
from thresher.calibration.catalog import build_feature_catalog
from thresher.calibration.evaluate import (Fidelity, SparsityMeter, compare_with_dense, fp8_weights_applied,
                                          level_thresholds, sae_spliced, thresholds_applied)
from thresher.calibration.report import write_report
from thresher.calibration.refine import RefineConfig, refine_thresholds_end_to_end
from thresher.calibration.sae_finetune import FineTuneConfig, finetune_sae_end_to_end
from thresher.calibration.sae_training import (Residuals, TrainingConfig, attention_sink_mask, bf16_is_native,
                                               collect_residuals, measure_sae, train_topk_sae)
from thresher.calibration.stages import StageLog, describe, estimate_stages
from thresher.calibration.statistics import STATISTICS_CHECKPOINT, StatisticsCheckpoint, collect_activation_statistics
from thresher.calibration.thresholds import fit_channel_thresholds
from thresher.calibration.vectors import contrastive_vectors, read_pairs
from thresher.models import DEFAULT_MODEL, compute_device, load_hf_model, resolve_model
from thresher.sae import SparseAutoencoder
from thresher.steering import SteeringAssets, save_steering_assets

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.25, 0.4, 0.5, 0.6)
DEFAULT_CALIBRATION_TOKENS = 24576
WINDOW_TOKENS = 512


def _windows(texts: list[str], tokenizer, max_tokens: int, what: str) -> list[list[int]]:
    window = min(WINDOW_TOKENS, max_tokens)
    windows = list(data.token_windows(texts, tokenizer, window, max_tokens))
    if not windows:
        raise data.DataError(f"the {what} text holds fewer than {window} tokens")
    return windows


@dataclass
class SAEOptions:
    """What `thresher calibrate` trains for steering: a TopK SAE after `layer` (default: the middle layer),
    its feature catalog, and contrastive vectors from `pairs` (default: the built-in set)."""

    layer: int | None = None
    tokens: int = 393216
    # Each text token is read in this many windows, offset by a fraction of a window, so the SAE also sees it after
    # contexts of other lengths: more distinct residuals from the same text.
    context_views: int = 2
    training: TrainingConfig = field(default_factory=TrainingConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    pairs: str | Path | None = None
    # the dtype the SAE's weights are written in (training and serving compute in float32)
    save_dtype: str = "float32"


def _write_steering_assets(model, tokenizer, texts: list[str], options: SAEOptions, out: Path,
                           model_name: str, stage: StageLog) -> dict:
    """Train the SAE, build its catalog and the vectors, and write them into `out` (replacing older ones)."""
    layer = model.config.num_hidden_layers // 2 if options.layer is None else options.layer
    windows = _windows(texts, tokenizer, options.tokens, "calibration")
    length = len(windows[0])
    offsets = [view * length // options.context_views for view in range(1, options.context_views)]
    shifted = [w for offset in offsets for w in data.token_windows(texts, tokenizer, length, options.tokens, offset)]
    first = len(windows) * length  # residuals [:first] are the first view's
    with stage("residual stream"):
        residuals = collect_residuals(model, windows + shifted, layer, bf16=bf16_is_native(model.device))
    keep = attention_sink_mask(residuals.vectors)
    log.info("SAE on layer %d: %d residuals from %d text tokens in %d views (%d attention-sink tokens left out)", layer,
             int(keep.sum()), first, options.context_views, int((~keep).sum()))
    rows = keep.nonzero().squeeze(1)
    with stage("SAE training"):
        sae = train_topk_sae(residuals, options.training, model_name, device=model.device, rows=rows)
    with stage("SAE fine-tune"):
        end_to_end = finetune_sae_end_to_end(model, sae, windows[: options.finetune.tokens // length],
                                             options.finetune, bf16=bf16_is_native(model.device))
    with stage("catalog and vectors"):
        # the catalog's contexts come from the first view only, so that no text position is listed twice
        first_view = Residuals(layer, residuals.vectors[:first], residuals.token_ids[:first], length)
        catalog = build_feature_catalog(sae, first_view, tokenizer, keep[:first])
        sae.cpu()  # saved from the host
        residual_norm = float(residuals.vectors.norm(dim=1)[keep].median())
        vectors, vector_info = contrastive_vectors(model, tokenizer, read_pairs(options.pairs), layer, residual_norm)
    source = str(options.pairs) if options.pairs else "built-in pairs"
    for info in vector_info.values():
        info["source"] = source

    save_steering_assets(out, sae, catalog, vectors, vector_info, sae_dtype=getattr(torch, options.save_dtype))
    return {"layer": layer, "tokens": int(keep.sum()), "live_features": len(catalog), "vectors": sorted(vectors),
            "end_to_end": end_to_end}


def calibrate(
    model: str | None,
    out: str | Path,
    data_path: str | None = None,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    method: str = "channel-greedy",
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    eval_tokens: int = 4096,
    sae: SAEOptions | None = None,
    refine: RefineConfig | None = None,
    device: str = "auto",
) -> dict:
    """Fit thresholds (and, with `sae`, the steering assets) on calibration text, write the artifact to `out`,
    and a quick quality report beside it. With `refine.tokens`, `channel-greedy` thresholds are then refined end to
    end; `teal-uniform` stays TEAL's baseline as it is. The model runs on `device` (`auto`: the CUDA GPU when there
    is one)."""
    levels = tuple(sorted(levels))
    if any(not 0.0 < level < 1.0 for level in levels):
        raise ValueError(f"sparsity levels must lie strictly between 0 and 1, got {list(levels)}")
    compute_device(device)  # a device that is not there is refused before the model is read
    resolved = resolve_model(model)
    identity = model_identity(resolved.path, resolved.name)
    hf_model, tokenizer = load_hf_model(resolved, device=device)
    log.info("calibrating on %s%s", hf_model.device, "" if bf16_is_native(hf_model.device) else
             " in fp32 (no bf16 matmul units here: the model's passes take several times longer than with them)")
    started = time.monotonic()
    texts = data.load_texts(data_path, "calibration")
    if eval_tokens > 0:  # a file too short for its report is refused now, not after the whole calibration
        _windows(data.load_texts(data_path, "evaluation"), tokenizer, eval_tokens, "evaluation")
    windows = _windows(texts, tokenizer, max_tokens, "calibration")
    refine = RefineConfig() if refine is None else refine
    refine_tokens = refine.tokens if method == "channel-greedy" else 0
    log.info("%s", describe(estimate_stages(
        hf_model, windows[0], calibration_tokens=max_tokens, refine_tokens=refine_tokens,
        refined_levels=sum(level >= refine.min_level for level in levels), sae=sae, eval_tokens=eval_tokens,
        eval_variants=len(levels) + (sae is not None)), hf_model.device))
    stage = StageLog(hf_model.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = StatisticsCheckpoint(out / STATISTICS_CHECKPOINT, {
        "fingerprint": identity.fingerprint, "data": str(data_path), "tokens": max_tokens})
    stats = checkpoint.load()
    if stats is None:
        with stage("statistics"):
            stats = collect_activation_statistics(hf_model, windows)
        checkpoint.save(stats)
    else:
        log.info("resuming: the statistics pass of an interrupted run was read back from %s", checkpoint.path)
    thresholds, reached = fit_channel_thresholds(stats, list(levels), method)
    refinement = []
    if refine_tokens > 0:
        refine_windows = _windows(texts, tokenizer, refine.tokens, "calibration")
        with stage("refinement"):
            thresholds, refinement = refine_thresholds_end_to_end(
                hf_model, stats, thresholds, list(levels), refine_windows, refine,
                bf16=bf16_is_native(hf_model.device))
        held = {entry["level"]: entry["calibration_sparsity"] for entry in refinement}
        reached = [held.get(level, fitted) for level, fitted in zip(levels, reached)]
    steering = {}
    if sae is not None:
        steering = _write_steering_assets(hf_model, tokenizer, texts, sae, out, resolved.name, stage)
    artifact = Artifact(
        model=identity,
        levels=[0.0, *levels],
        method=method,
        thresholds=thresholds,
        calibration={
            "model_source": str(model or DEFAULT_MODEL),
            "tokens": stats.tokens,
            "data": str(data_path) if data_path else "embedded Wikipedia sample (calibration split)",
            "calibration_sparsity": [round(r, 4) for r in reached],
            "refinement": refinement,
            "steering": steering,
            "seconds": round(time.monotonic() - started, 1),
            "stages": stage.records,
        },
    )
    checkpoint.remove()
    artifact.save(out)
    log.info("wrote artifact %s (%d levels, %s) in %.0f s", out, len(levels), method, time.monotonic() - started)
    if eval_tokens <= 0:
        return {}
    with stage("report"):
        return evaluate_artifacts([out], data_path=data_path, eval_tokens=eval_tokens, hf_model=hf_model,
                                  tokenizer=tokenizer)


def evaluate_artifacts(
    artifacts: list[str | Path],
    model: str | None = None,
    data_path: str | None = None,
    eval_tokens: int = 16384,
    report_dir: str | Path | None = None,
    hf_model=None,
    tokenizer=None,
    device: str = "auto",
    fp8_weights: str | None = None,
) -> dict:
    """Perplexity of the dense model, and perplexity, KL divergence from the dense model and measured sparsity of
    every level of every artifact (all fitted on the same model); the SAE's quality if the first artifact has one.
    With `fp8_weights` ("per-tensor" or "per-channel" scales), the same again with FP8 weights
    (`fp8_weights_applied`), each against its level with the model's own weights.

    The model is `model`, else the one the first artifact was calibrated from; a mismatch is an ArtifactError. It
    runs on `device` unless `hf_model` is given.
    """
    loaded = [load_artifact(a) for a in artifacts]
    first = loaded[0]
    if hf_model is None:
        resolved = resolve_model(model or first.calibration.get("model_source"))
        identity = model_identity(resolved.path, resolved.name)
        hf_model, tokenizer = load_hf_model(resolved, device=device)
    else:
        identity = first.model
    for artifact in loaded:
        artifact.check_model(identity)
    windows = _windows(data.load_texts(data_path, "evaluation"), tokenizer, eval_tokens, "evaluation")
    variants, meters = {}, {}
    for number, artifact in enumerate(loaded):
        for index in range(1, len(artifact.levels)):
            meters[number, index] = SparsityMeter()
            variants[number, index] = functools.partial(
                thresholds_applied, hf_model, level_thresholds(artifact.thresholds, index), meters[number, index])
    if fp8_weights:
        variants["fp8"] = functools.partial(fp8_weights_applied, hf_model, fp8_weights)
        for number, index in meters:
            thresholds = functools.partial(thresholds_applied, hf_model,
                                           level_thresholds(loaded[number].thresholds, index))
            variants["fp8", number, index] = functools.partial(_stacked, variants["fp8"], thresholds)
    assets = SteeringAssets(first.path, identity.hidden_size)
    sae = None if assets.sae is None else assets.sae.to(hf_model.device)
    if sae is not None:
        variants["sae"] = functools.partial(sae_spliced, hf_model, sae)
    dense, scores = compare_with_dense(hf_model, windows, variants)
    report = {
        "model": first.model.name,
        "tokens": sum(len(w) for w in windows),
        "data": str(data_path) if data_path else "embedded Wikipedia sample (held-out split)",
        "dense": {"perplexity": dense},
        "levels": [{"level": loaded[number].levels[index], "method": loaded[number].method,
                    "measured_sparsity": round(meter.sparsity, 4), "perplexity": scores[number, index].perplexity,
                    "kl_from_dense": round(scores[number, index].kl_from_dense, 4)}
                   for (number, index), meter in meters.items()],
    }
    if fp8_weights:
        report["fp8_weights"] = {
            "scales": fp8_weights,
            "dense": {"perplexity": scores["fp8"].perplexity, "kl_from_dense": round(scores["fp8"].kl_from_dense, 4),
                      "vs_own_weights": round(scores["fp8"].perplexity / dense - 1, 5)},
            "levels": [{"level": loaded[number].levels[index], "method": loaded[number].method,
                        "perplexity": scores["fp8", number, index].perplexity,
                        "kl_from_dense": round(scores["fp8", number, index].kl_from_dense, 4),
                        "vs_own_weights": round(scores["fp8", number, index].perplexity
                                                / scores[number, index].perplexity - 1, 5)}
                       for number, index in meters],
        }
    if sae is not None:
        report["sae"] = evaluate_sae(hf_model, windows, sae, dense, scores["sae"],
                                     live_features=len(assets.catalog))
    write_report(report, report_dir or first.path)
    return report


@contextlib.contextmanager
def _stacked(*factories):
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory())
        yield


def evaluate_sae(model, windows: list[list[int]], sae: SparseAutoencoder, dense_perplexity: float, spliced: Fidelity,
                 live_features: int) -> dict:
    """Held-out SAE quality: FVU and L0 on the residuals (sinks left out), and (from `spliced`) the perplexity
    increase and KL divergence when the reconstruction replaces the layer's output. Dead latents are the ones that
    never fired on the SAE's training tokens (the catalog lists every other one), the usual definition: a few
    thousand held-out tokens cannot tell a rare latent from a dead one, so the latents silent on them are reported
    apart."""
    residuals = collect_residuals(model, windows, sae.hook_layer, desc="held-out residual stream")
    quality = measure_sae(sae, residuals.vectors[attention_sink_mask(residuals.vectors)])
    return {
        "layer": sae.hook_layer,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "fvu": round(quality.fvu, 4),
        "l0": round(quality.l0, 2),
        "dead_fraction": round(1 - live_features / sae.d_sae, 4),
        "held_out_silent_fraction": round(quality.silent_fraction, 4),
        "perplexity_increase": round(spliced.perplexity / dense_perplexity - 1, 4),
        "kl_from_dense": round(spliced.kl_from_dense, 4),
    }
