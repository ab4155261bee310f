"""Contrastive steering vectors (contrastive activation addition): the mean residual after layer L over positive
examples minus the mean over negative ones.

Pairs come from jsonl lines `{"name": ..., "positive": text, "negative": text}`: the user's file, and a small
built-in set (formal, positive, terse) written for this project. Each text's first token is left out: it is the
attention sink, whose residual is two orders of magnitude larger than any other.
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib.resources import files
from pathlib import Path

import torch

from thresher.data import DataError

BUILT_IN_PAIRS = files("thresher.calibration") / "data" / "steering_pairs.jsonl"


def read_pairs(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Named (positive, negative) pairs from a jsonl file (default: the built-in set)."""
    source = Path(path) if path else BUILT_IN_PAIRS
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, positive, negative = record["name"], record["positive"], record["negative"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{source}:{number}: expected {{\"name\", \"positive\", \"negative\"}}: {exc}") from exc
        if not (isinstance(name, str) and name.isidentifier() and isinstance(positive, str)
                and isinstance(negative, str)):
            raise DataError(f"{source}:{number}: 'name' must be an identifier and the texts strings")
        pairs[name].append((positive, negative))
    if not pairs:
        raise DataError(f"{source} holds no steering pairs")
    return dict(pairs)


@torch.no_grad()
def _mean_residual(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    hidden = model.model(ids, output_hidden_states=True).hidden_states[layer + 1][0].float().cpu()
    return hidden[1:].mean(dim=0) if len(hidden) > 1 else hidden[0]


def contrastive_vectors(model, tokenizer, pairs: dict[str, list[tuple[str, str]]], layer: int,
                        residual_norm: float) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per name: the mean positive-minus-negative residual difference, and its metadata.

    Strength 1.0 adds the vector as measured; `suggested_strength` makes its norm a quarter of the typical
    residual norm at the layer, a push that changes style without breaking fluency on the embedded model.
    """
    vectors, metadata = {}, {}
    for name, examples in pairs.items():
        differences = [_mean_residual(model, tokenizer, positive, layer) - _mean_residual(model, tokenizer, negative,
                                                                                          layer)
                       for positive, negative in examples]
        vector = torch.stack(differences).mean(dim=0)
        vectors[name] = vector
        metadata[name] = {
            "layer": layer,
            "norm": round(float(vector.norm()), 4),
            "residual_norm": round(residual_norm, 4),
            "suggested_strength": round(0.25 * residual_norm / float(vector.norm()), 3),
            "pairs": len(examples),
        }
    return vectors, metadata
