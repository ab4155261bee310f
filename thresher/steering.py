"""Steering specs and the artifact's steering assets: SAE decoder rows, named vectors and the feature catalog.

A spec is a sparse sum of directions added to the residual stream after one decoder layer, for every token of a
request:

    {"layer": 15, "features": [{"id": 1234, "strength": 6.0}], "vectors": [{"name": "formal", "strength": 2.0}]}

A feature's strength is in units of that feature's mean activation when it fires (strength 1 adds its decoder row
scaled as if the feature fired at its typical level); a vector's strength multiplies the stored contrastive vector
(`suggested_strength` in `/v1/steering/vectors` is a sensible push). The server validates specs here and turns a
`SteeringError` into a 400; the engine computes the same direction from the same assets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import cached_property
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thresher.artifact import FEATURES, SAE_DIR, STEERING_ENTRIES, VECTORS_DIR
from thresher.sae import SparseAutoencoder, load_sae

VECTORS_TENSORS = "vectors/vectors.safetensors"
VECTORS_META = "vectors/vectors.json"
MAX_ENTRIES = 16
MAX_STRENGTH = 100.0


class SteeringError(ValueError):
    """A steering spec the artifact cannot serve; `param` names the offending field."""

    def __init__(self, message: str, param: str = "steering"):
        super().__init__(message)
        self.param = param


class FeatureTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(description="SAE feature (latent) index at the steering layer.")
    strength: float = Field(description="Multiple of the feature's mean activation when it fires.")


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
        path = self.directory / FEATURES
        return json.loads(path.read_text())["features"] if path.is_file() else []

    @cached_property
    def _catalog_by_id(self) -> dict[int, dict]:
        return {entry["id"]: entry for entry in self.catalog}

    def feature(self, feature_id: int) -> dict | None:
        return self._catalog_by_id.get(feature_id)

    def search_features(self, query: str = "", limit: int = 20, offset: int = 0) -> list[dict]:
        """Catalog entries whose label, top tokens or contexts contain `query` (case-insensitive), densest first."""
        needle = query.lower()

        def matches(entry: dict) -> bool:
            if needle in entry["label"].lower():
                return True
            return any(needle in t["token"].lower() for t in entry["top_tokens"]) or any(
                needle in c["text"].lower() for c in entry["top_contexts"])

        hits = [e for e in self.catalog if matches(e)] if needle else list(self.catalog)
        hits.sort(key=lambda e: -e["density"])
        return hits[offset : offset + limit]

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
        if len(spec.features) + len(spec.vectors) > MAX_ENTRIES:
            raise SteeringError(f"steering has {len(spec.features) + len(spec.vectors)} entries; at most "
                                f"{MAX_ENTRIES} are allowed")
        for i, term in enumerate(spec.features):
            where = f"steering.features.{i}"
            if self.sae is None:
                raise SteeringError("this artifact has no SAE; steer with vectors", param=f"{where}.id")
            if not 0 <= term.id < self.sae.d_sae:
                raise SteeringError(f"{where}.id: feature {term.id} does not exist; ids run 0..{self.sae.d_sae - 1}",
                                    param=f"{where}.id")
            self._check_strength(term.strength, f"{where}.strength")
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
            total += term.strength * self.feature_scale(term.id) * self.sae.W_dec[term.id].detach()
        for term in spec.vectors:
            total += term.strength * self.vectors[term.name].float()
        return total


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
