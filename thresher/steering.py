"""Steering specs and the artifact's steering assets: SAE decoder rows, named vectors and the feature catalog.

A spec changes the residual stream after one decoder layer, for every token of a request:

    {"layer": 15, "features": [{"id": 1234, "strength": 6.0}, {"id": 1808, "clamp": 0.0}],
     "vectors": [{"name": "formal", "strength": 2.0}]}

Adding: a feature's strength is in units of that feature's mean activation when it fires (strength 1 adds its
decoder row scaled as if the feature fired at its typical level); a vector's strength multiplies the stored
contrastive vector (`suggested_strength` in `/v1/steering/vectors` is a sensible push). The added directions sum into
one vector per spec.

Clamping: `clamp` sets a feature's activation, as the SAE's encoder reads it after the added directions, to the value
(0 removes the concept). Each token's pre-activation `p` moves to the value along the feature's decoder row, scaled by
1 / (encoder row . decoder row) so that the encoder reads the value exactly rather than a value skewed by how far the
two rows disagree; a feature that is off (`p <= 0`) stays untouched by a clamp to 0. The gate is the feature's own
ReLU: a TopK SAE's competition between features is not part of what a clamp sets. Clamps are assignments: a feature
clamped twice in one spec ends at the last value.

The server validates specs here and turns a `SteeringError` into a 400; the engine computes the same direction and
clamp rows from the same assets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from thresher.artifact import FEATURES, SAE_DIR, STEERING_ENTRIES, SWEEP, VECTORS_DIR
from thresher.sae import SparseAutoencoder, load_sae

VECTORS_TENSORS = "vectors/vectors.safetensors"
VECTORS_META = "vectors/vectors.json"
# per spec: each list is bounded on its own, so that the OpenAPI schema states every limit the server holds
MAX_FEATURES = MAX_VECTORS = 8
MAX_STRENGTH = 100.0
MAX_CLAMPS = MAX_FEATURES  # the engine keeps this many clamp rows per steering slot: any feature may be clamped
MAX_CLAMP = 1000.0
# a feature whose encoder and decoder rows are this close to orthogonal cannot be moved to a value along its decoder
MIN_CLAMP_ALIGNMENT = 0.05


class SteeringError(ValueError):
    """A steering spec the artifact cannot serve; `param` names the offending field."""

    def __init__(self, message: str, param: str = "steering"):
        super().__init__(message)
        self.param = param


class FeatureTerm(BaseModel):
    """One SAE feature, added (`strength`) or clamped (`clamp`): exactly one of the two."""

    model_config = ConfigDict(extra="forbid")
    id: int = Field(description="SAE feature (latent) index at the steering layer.")
    strength: float | None = Field(default=None, description="Add the feature: a multiple of its mean activation "
                                   "when it fires.")
    clamp: float | None = Field(default=None, description=f"Clamp the feature: set its activation to this value "
                                f"(0 removes it; 0..{MAX_CLAMP:g}, in the units of the catalog's mean_activation).")

    @model_validator(mode="after")
    def _adds_or_clamps(self):
        for name in ("strength", "clamp"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"'{name}' must be a number")
        if (self.strength is None) == (self.clamp is None):
            raise ValueError("give exactly one of 'strength' (add the feature) or 'clamp' (set its activation)")
        return self

    @model_serializer(mode="wrap")
    def _without_the_other_mode(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class VectorTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Name of a steering vector in the artifact (see /v1/steering/vectors).")
    strength: float = Field(description="Multiple of the stored contrastive vector.")


class SteeringSpec(BaseModel):
    """Directions added to the residual stream after decoder layer `layer` for every token of the request."""

    model_config = ConfigDict(extra="forbid")
    layer: int | None = Field(default=None, description="Decoder layer; default: the artifact's SAE layer.")
    features: list[FeatureTerm] = Field(default_factory=list)
    vectors: list[VectorTerm] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.features and not self.vectors

    def cache_key(self) -> str:
        """A stable digest of the spec: the prefix-cache salt, so steered KV never serves another spec."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class SteeringAssets:
    """The steering layer's SAE decoder, the named vectors and the catalog of one artifact directory."""

    def __init__(self, artifact_dir: str | os.PathLike, hidden_size: int):
        self.directory = Path(artifact_dir)
        self.hidden_size = hidden_size
        sae_dirs = sorted((self.directory / SAE_DIR).glob("layer_*"))
        # on the host: vLLM builds models under a CUDA default device, and directions are made on the host
        with torch.device("cpu"):
            self.sae: SparseAutoencoder | None = load_sae(sae_dirs[0], d_in=hidden_size) if sae_dirs else None
        meta_path = self.directory / VECTORS_META
        self.vector_info: dict[str, dict] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self._vectors: dict[str, torch.Tensor] | None = None
        sweep_path = self.directory / SWEEP
        # measured best strengths (`thresher steering-eval`) replace the rule of thumb
        self.measured: dict[str, dict] = json.loads(sweep_path.read_text())["best"] if sweep_path.is_file() else {}
        for name, info in self.vector_info.items():
            info["rule_of_thumb_strength"] = info["suggested_strength"]
            best = self.measured.get(f"{name}:add")
            if best is not None:
                info["suggested_strength"] = best["strength"]

    @property
    def layer(self) -> int | None:
        if self.sae is not None:
            return self.sae.hook_layer
        return next((info["layer"] for info in self.vector_info.values()), None)

    @property
    def available(self) -> bool:
        return self.layer is not None

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        if self._vectors is None:
            from safetensors.torch import load_file

            path = self.directory / VECTORS_TENSORS
            self._vectors = load_file(path) if path.is_file() else {}
        return self._vectors

    @cached_property
    def catalog(self) -> list[dict]:
        """The catalog's entries, each labelled by its distinctive tokens (`distinctive_labels`)."""
        path = self.directory / FEATURES
        entries = distinctive_labels(json.loads(path.read_text())["features"] if path.is_file() else [])
        for entry in entries:
            for mode, key in (("add", "suggested_strength"), ("clamp", "suggested_clamp")):
                best = self.measured.get(f"feature {entry['id']}:{mode}")
                if best is not None:
                    entry[key] = best["strength"]
        return entries

    @cached_property
    def _catalog_by_id(self) -> dict[int, dict]:
        return {entry["id"]: entry for entry in self.catalog}

    def feature(self, feature_id: int) -> dict | None:
        return self._catalog_by_id.get(feature_id)

    def search_features(self, query: str = "", limit: int = 20, offset: int = 0) -> list[dict]:
        """Catalog entries whose label, top tokens or contexts contain `query` (case-insensitive): those whose label
        holds it first, then those with it among their top tokens, then in their contexts; densest first within
        each."""
        needle = query.lower()

        def rank(entry: dict) -> int:
            if needle in entry["label"].lower():
                return 0
            if any(needle in t["token"].lower() for t in entry["top_tokens"]):
                return 1
            return 2 if any(needle in c["text"].lower() for c in entry["top_contexts"]) else 3

        ranked = ((rank(e), -e["density"], e["id"], e) for e in self.catalog)
        hits = sorted(r for r in ranked if r[0] < 3) if needle else sorted((0, -e["density"], e["id"], e)
                                                                        for e in self.catalog)
        return [hit[-1] for hit in hits[offset : offset + limit]]

    def parse(self, raw: object) -> SteeringSpec:
        """A validated spec from request JSON; every problem is a SteeringError naming the field."""
        try:
            spec = SteeringSpec.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in ("steering", *first["loc"]))
            raise SteeringError(f"{where}: {first['msg']}", param=where) from None
        self.validate(spec)
        return spec

    def validate(self, spec: SteeringSpec) -> None:
        if spec.is_empty():
            return
        if not self.available:
            raise SteeringError("this artifact has no SAE or steering vectors; steering is not available")
        if spec.layer is not None and spec.layer != self.layer:
            raise SteeringError(f"steering.layer {spec.layer} has no SAE or vectors; the artifact steers at layer "
                                f"{self.layer}", param="steering.layer")
        for name, terms, bound in (("features", spec.features, MAX_FEATURES), ("vectors", spec.vectors, MAX_VECTORS)):
            if len(terms) > bound:
                raise SteeringError(f"steering.{name} has {len(terms)} entries; at most {bound} are allowed",
                                    param=f"steering.{name}")
        for i, term in enumerate(spec.features):
            where = f"steering.features.{i}"
            if self.sae is None:
                raise SteeringError("this artifact has no SAE; steer with vectors", param=f"{where}.id")
            if not 0 <= term.id < self.sae.d_sae:
                raise SteeringError(f"{where}.id: feature {term.id} does not exist; ids run 0..{self.sae.d_sae - 1}",
                                    param=f"{where}.id")
            if term.strength is not None:
                self._check_strength(term.strength, f"{where}.strength")
                continue
            if not (math.isfinite(term.clamp) and 0.0 <= term.clamp <= MAX_CLAMP):
                raise SteeringError(f"{where}.clamp: a clamp must lie within 0..{MAX_CLAMP:g}, got {term.clamp}",
                                    param=f"{where}.clamp")
            if self._clamp_alignment[term.id] < MIN_CLAMP_ALIGNMENT:
                raise SteeringError(f"{where}.clamp: feature {term.id} cannot be clamped (its encoder and decoder "
                                    "rows are nearly orthogonal); add it with a strength instead",
                                    param=f"{where}.clamp")
        for i, term in enumerate(spec.vectors):
            where = f"steering.vectors.{i}"
            if term.name not in self.vector_info:
                raise SteeringError(f"{where}.name: unknown steering vector {term.name!r}; available: "
                                    f"{', '.join(sorted(self.vector_info)) or 'none'}", param=f"{where}.name")
            self._check_strength(term.strength, f"{where}.strength")

    @staticmethod
    def _check_strength(strength: float, where: str) -> None:
        if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
            raise SteeringError(f"{where}: strength must be finite and within ±{MAX_STRENGTH:g}, got {strength}",
                                param=where)

    def feature_scale(self, feature_id: int) -> float:
        """Mean activation of the feature when it fires (1.0 for a feature the catalog does not list)."""
        entry = self.feature(feature_id)
        return float(entry["mean_activation"]) if entry else 1.0

    def direction(self, spec: SteeringSpec) -> torch.Tensor:
        """The float32 vector `[hidden]` the spec adds to each of its tokens' residuals."""
        total = torch.zeros(self.hidden_size, device="cpu")
        for term in spec.features:
            if term.strength is not None:
                total += term.strength * self.feature_scale(term.id) * self.sae.W_dec[term.id].detach()
        for term in spec.vectors:
            total += term.strength * self.vectors[term.name].float()
        return total

    @cached_property
    def _clamp_alignment(self) -> torch.Tensor:
        """Per feature, its encoder row . its decoder row."""
        return (self.sae.W_enc.detach().t() * self.sae.W_dec.detach()).sum(dim=1)

    def clamp_rows(self, spec: SteeringSpec) -> "ClampRows":
        """The float32 rows that clamp the spec's clamped features (none: empty rows)."""
        # clamps are assignments: a feature clamped twice ends at its last value
        terms = list({term.id: term for term in spec.features if term.clamp is not None}.values())
        ids = torch.tensor([term.id for term in terms], dtype=torch.long)
        encoder = self.sae.W_enc.detach()[:, ids].t() if terms else torch.zeros(0, self.hidden_size)
        bias = (self.sae.b_enc.detach()[ids] - self.sae.b_dec.detach() @ self.sae.W_enc.detach()[:, ids]
                if terms else torch.zeros(0))
        decoder = (self.sae.W_dec.detach()[ids] / self._clamp_alignment[ids, None] if terms
                   else torch.zeros(0, self.hidden_size))
        values = torch.tensor([term.clamp for term in terms], dtype=torch.float32)
        return ClampRows(encoder, bias, decoder, values)


class ClampRows(NamedTuple):
    """Clamps as rows: pre-activation `x @ encoder.T + bias`; moving it by `d` adds `d * decoder` to `x`."""

    encoder: torch.Tensor  # [n, hidden]
    bias: torch.Tensor  # [n]
    decoder: torch.Tensor  # [n, hidden], each row divided by its alignment
    values: torch.Tensor  # [n]


def clamp_delta(stream: torch.Tensor, rows: ClampRows, owned: torch.Tensor | None = None) -> torch.Tensor:
    """What clamping adds to float32 residuals `stream` `[tokens, hidden]`; `owned` `[tokens, n]` says which rows
    apply to which token (default: all)."""
    pre = stream @ rows.encoder.t() + rows.bias
    current = torch.where(rows.values > 0, pre, pre.clamp_min(0.0))
    move = rows.values - current
    if owned is not None:
        move = move * owned
    return move @ rows.decoder


LABEL_TOKENS = 3


def distinctive_labels(entries: list[dict]) -> list[dict]:
    """Each entry with a `label` of its most distinctive top tokens: a token's share of the feature's activation,
    weighted by how rare the token is among all features' top tokens (inverse document frequency over the catalog),
    so that tokens every feature fires near ("the", "of", ",") give way to what this one is about. The raw
    `top_tokens` stay as they are, ordered by activation."""
    listed_by = Counter(token["token"].strip().lower() for entry in entries for token in entry["top_tokens"])
    labelled = []
    for entry in entries:
        scores: dict[str, float] = {}
        for token in entry["top_tokens"]:
            word = token["token"].strip()
            if word:
                rarity = math.log(len(entries) / listed_by[word.lower()])
                scores[word] = max(scores.get(word, 0.0), token["activation_sum"] * rarity)
        best = sorted(scores, key=lambda word: -scores[word])[:LABEL_TOKENS]
        labelled.append({**entry, "label": " / ".join(best) or entry.get("label", "")})
    return labelled


def save_steering_assets(directory: str | os.PathLike, sae: SparseAutoencoder | None, catalog: list[dict],
                         vectors: dict[str, torch.Tensor], vector_info: dict[str, dict],
                         sae_dtype: torch.dtype = torch.float32) -> None:
    """Write an SAE, its catalog and named vectors into an artifact directory, replacing older ones.

    Call before `Artifact.save`, which records their sha256 in the manifest.
    """
    import shutil

    from safetensors.torch import save_file

    directory = Path(directory)
    for entry in STEERING_ENTRIES:
        path = directory / entry
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if sae is not None:
        sae.save(directory / SAE_DIR / f"layer_{sae.hook_layer}", dtype=sae_dtype)
        (directory / FEATURES).write_text(json.dumps({"layer": sae.hook_layer, "d_sae": sae.d_sae,
                                                      "features": catalog}) + "\n")
    if vectors:
        (directory / VECTORS_DIR).mkdir(parents=True, exist_ok=True)
        save_file({name: v.contiguous() for name, v in vectors.items()}, directory / VECTORS_TENSORS)
        (directory / VECTORS_META).write_text(json.dumps(vector_info, indent=2) + "\n")
