"""`thresher calibrate` and `thresher eval` as functions: model + text in, artifact and report out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from thresher import data
from thresher.artifact import Artifact, load_artifact, model_identity
from thresher.calibration.evaluate import evaluate_levels, perplexity
from thresher.calibration.report import write_report
from thresher.calibration.statistics import collect_activation_statistics
from thresher.calibration.thresholds import fit_channel_thresholds
from thresher.models import DEFAULT_MODEL, load_hf_model, resolve_model

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.25, 0.4, 0.5, 0.6)
WINDOW_TOKENS = 512


def _windows(texts: list[str], tokenizer, max_tokens: int, what: str) -> list[list[int]]:
    window = min(WINDOW_TOKENS, max_tokens)
    windows = list(data.token_windows(texts, tokenizer, window, max_tokens))
    if not windows:
        raise data.DataError(f"the {what} text holds fewer than {window} tokens")
    return windows


def calibrate(
    model: str | None,
    out: str | Path,
    data_path: str | None = None,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    method: str = "channel-greedy",
    max_tokens: int = 16384,
    eval_tokens: int = 4096,
) -> dict:
    """Fit thresholds on calibration text, write the artifact to `out`, and a quick quality report beside it."""
    levels = tuple(sorted(levels))
    if any(not 0.0 < level < 1.0 for level in levels):
        raise ValueError(f"sparsity levels must lie strictly between 0 and 1, got {list(levels)}")
    resolved = resolve_model(model)
    hf_model, tokenizer = load_hf_model(resolved)
    started = time.monotonic()
    windows = _windows(data.load_texts(data_path, "calibration"), tokenizer, max_tokens, "calibration")
    stats = collect_activation_statistics(hf_model, windows)
    thresholds, reached = fit_channel_thresholds(stats, list(levels), method)
    artifact = Artifact(
        model=model_identity(resolved.path, resolved.name),
        levels=[0.0, *levels],
        method=method,
        thresholds=thresholds,
        calibration={
            "model_source": str(model or DEFAULT_MODEL),
            "tokens": stats.tokens,
            "data": str(data_path) if data_path else "embedded Wikipedia sample (calibration split)",
            "calibration_sparsity": [round(r, 4) for r in reached],
            "seconds": round(time.monotonic() - started, 1),
        },
    )
    artifact.save(out)
    log.info("wrote artifact %s (%d levels, %s) in %.0f s", out, len(levels), method, time.monotonic() - started)
    if eval_tokens <= 0:
        return {}
    return evaluate_artifacts([out], eval_tokens=eval_tokens, hf_model=hf_model, tokenizer=tokenizer)


def evaluate_artifacts(
    artifacts: list[str | Path],
    model: str | None = None,
    data_path: str | None = None,
    eval_tokens: int = 16384,
    report_dir: str | Path | None = None,
    hf_model=None,
    tokenizer=None,
) -> dict:
    """Perplexity of the dense model and of every level of every artifact (all fitted on the same model).

    The model is `model`, else the one the first artifact was calibrated from; a mismatch is an ArtifactError.
    """
    loaded = [load_artifact(a) for a in artifacts]
    first = loaded[0]
    if hf_model is None:
        resolved = resolve_model(model or first.calibration.get("model_source"))
        identity = model_identity(resolved.path, resolved.name)
        hf_model, tokenizer = load_hf_model(resolved)
    else:
        identity = first.model
    for artifact in loaded:
        artifact.check_model(identity)
    windows = _windows(data.load_texts(data_path, "evaluation"), tokenizer, eval_tokens, "evaluation")
    report = {
        "model": first.model.name,
        "tokens": sum(len(w) for w in windows),
        "data": str(data_path) if data_path else "embedded Wikipedia sample (held-out split)",
        "dense": {"perplexity": perplexity(hf_model, windows, desc="perplexity, dense")},
        "levels": [],
    }
    for artifact in loaded:
        for entry in evaluate_levels(hf_model, windows, artifact.thresholds, artifact.levels[1:]):
            report["levels"].append({"level": entry["level"], "method": artifact.method, **entry})
    write_report(report, report_dir or first.path)
    return report
