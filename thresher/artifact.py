"""The calibration artifact: a directory with a manifest, thresholds, an SAE and steering vectors.

    manifest.json           format, thresher version, model identity, levels, method, sha256 of every file
    thresholds.safetensors  per tensor `layers.<i>.<group>`: float32 [levels, in_features], row 0 = level 0 (dense)
    sae/layer_<L>/          the SAE in the SAELens layout (`thresher.sae`)        } optional; read through
    features.json           the feature catalog                                   } `thresher.steering`
    vectors/                vectors.safetensors + vectors.json (named vectors)    }
    report.json, report.png the quality report

Loading checks every file's sha256 and every tensor's shape, and, given a model, that the artifact was fitted on
that model: a mismatch is an `ArtifactError` naming both, never a silent misfit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from thresher import __version__
from thresher.families import Family, UnsupportedArchitecture, family_of

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
THRESHOLDS = "thresholds.safetensors"
# the optional steering assets (read and written through `thresher.steering`)
SAE_DIR, FEATURES, VECTORS_DIR = "sae", "features.json", "vectors"
SWEEP = "steering_sweep.json"  # `thresher steering-eval`'s best strengths
STEERING_ENTRIES = (SAE_DIR, FEATURES, VECTORS_DIR, SWEEP)
# Artifacts shipped inside the package, one folder per model name: the embedded default's reference artifact, made by
# `thresher calibrate --out thresher/reference_artifacts/SmolLM2-135M-Instruct --sae-dtype float16` (README, "The
# reference artifact"), so that the first `thresher serve` needs no calibration of its own.
REFERENCE_ARTIFACTS = Path(__file__).parent / "reference_artifacts"


class ArtifactError(ValueError):
    """An artifact that is missing, damaged, or fitted on another model."""


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact must agree with: the shapes thresher patches and a fingerprint of config and weights."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    fingerprint: str
    # only where the config sets one other than hidden_size / num_heads (Qwen3), so older manifests stay equal
    head_dim: int | None = None

    @property
    def family(self) -> Family:
        return family_of(self.architecture)

    def in_features(self, group: str) -> int:
        width = next(g.width for g in self.family.groups if g.name == group)
        attention = self.num_heads * (self.head_dim or self.hidden_size // self.num_heads)
        return {"hidden": self.hidden_size, "attention": attention, "intermediate": self.intermediate_size}[width]

    def tensor_names(self) -> list[tuple[str, str]]:
        """`(tensor name, group name)` of every thresholded input, layer by layer."""
        return [(group.tensor_name(layer), group.name) for layer in range(self.num_layers)
                for group in self.family.groups]


_WEIGHT_SAMPLE = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")
_SAMPLE_VALUES = 4096


def model_identity(model_path: str | os.PathLike, name: str | None = None) -> ModelIdentity:
    """Identity of an HF model folder, read from config.json and a sample of the safetensors weights."""
    import torch
    from safetensors import safe_open

    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    digest = hashlib.sha256()
    shape_keys = ("architectures", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim")
    digest.update(json.dumps({k: config.get(k) for k in shape_keys}, sort_keys=True).encode())
    files = sorted(path.glob("*.safetensors"))
    for tensor_name in _WEIGHT_SAMPLE:
        for file in files:
            with safe_open(file, framework="pt") as f:
                if tensor_name in f.keys():
                    sample = f.get_slice(tensor_name)[:8].reshape(-1)[:_SAMPLE_VALUES]
                    # to the CPU: vLLM builds models under a CUDA default device
                    digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
                    break
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    return ModelIdentity(
        name=name or path.name,
        architecture=(config.get("architectures") or ["unknown"])[0],
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads", num_heads),
        fingerprint=digest.hexdigest()[:16],
        head_dim=head_dim if head_dim and head_dim != config["hidden_size"] // num_heads else None,
    )


def dense_thresholds(identity: ModelIdentity, num_levels: int) -> dict[str, torch.Tensor]:
    """All-zero threshold tables `[num_levels, in_features]` for every input of the model: every level dense, to be
    filled in (benchmarks of models that exist only in the engine start from these)."""
    return {name: torch.zeros(num_levels, identity.in_features(group)) for name, group in identity.tensor_names()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _artifact_files(directory: Path) -> list[str]:
    """The files a manifest covers: thresholds and whatever steering assets the directory holds."""
    names = [THRESHOLDS]
    for entry in STEERING_ENTRIES:
        path = directory / entry
        if path.is_file():
            names.append(entry)
        elif path.is_dir():
            names.extend(sorted(str(f.relative_to(directory)) for f in path.rglob("*") if f.is_file()))
    return names


def level_index(levels: list[float], level: float) -> int:
    """Index of a calibrated level; anything else is an error naming the levels on offer."""
    for index, candidate in enumerate(levels):
        if abs(candidate - level) < 1e-6:
            return index
    raise ArtifactError(f"sparsity level {level} was not calibrated; available levels: {levels}")


@dataclass
class Artifact:
    """An artifact in memory: model identity, levels (levels[0] == 0.0), method and threshold tables."""

    model: ModelIdentity
    levels: list[float]
    method: str
    thresholds: dict[str, torch.Tensor]
    calibration: dict = field(default_factory=dict)
    path: Path | None = None

    def level_index(self, level: float) -> int:
        return level_index(self.levels, level)

    def validate(self) -> None:
        if not self.levels or self.levels[0] != 0.0 or sorted(self.levels) != self.levels:
            raise ArtifactError(f"levels must start at 0.0 and increase, got {self.levels}")
        for name, group in self.model.tensor_names():
            table = self.thresholds.get(name)
            expected = (len(self.levels), self.model.in_features(group))
            if table is None:
                raise ArtifactError(f"thresholds for {name} are missing")
            if tuple(table.shape) != expected:
                raise ArtifactError(f"thresholds for {name} have shape {tuple(table.shape)}, expected {expected}")
            if not torch.isfinite(table).all() or (table < 0).any():
                raise ArtifactError(f"thresholds for {name} hold negative or non-finite values")
            if (table[0] != 0).any():
                raise ArtifactError(f"thresholds for {name}: level 0 must be all zeros (dense)")

    def check_model(self, identity: ModelIdentity) -> None:
        """Fail unless this artifact was fitted on the model `identity` describes."""
        if replace(identity, name=self.model.name) != self.model:
            raise ArtifactError(
                f"artifact {self.path or ''} was calibrated for model '{self.model.name}' "
                f"({self.model.architecture}, {self.model.num_layers} layers, hidden {self.model.hidden_size}, "
                f"fingerprint {self.model.fingerprint}) but the model given is '{identity.name}' "
                f"({identity.architecture}, {identity.num_layers} layers, hidden {identity.hidden_size}, "
                f"fingerprint {identity.fingerprint}); calibrate this model with `thresher calibrate --model ...`"
            )

    def save(self, directory: str | os.PathLike) -> Path:
        self.validate()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.thresholds.items()}, directory / THRESHOLDS)
        manifest = {
            "format": FORMAT_VERSION,
            "thresher_version": __version__,
            "model": asdict(self.model),
            "levels": self.levels,
            "method": self.method,
            "calibration": self.calibration,
            "files": {name: _sha256(directory / name) for name in _artifact_files(directory)},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        self.path = directory
        return directory


def reference_artifact(identity: ModelIdentity, root: Path = REFERENCE_ARTIFACTS) -> Path | None:
    """The artifact shipped for the model `identity` names, verified against it (every file's sha256, the model's
    fingerprint); None where none is shipped, an `ArtifactError` saying what is wrong where one is but cannot serve."""
    directory = root / identity.name
    if not (directory / MANIFEST).is_file():
        return None
    try:
        load_artifact(directory, model=identity)
    except ArtifactError as error:
        raise ArtifactError(f"the reference artifact shipped for {identity.name} cannot serve it: {error}") from None
    return directory


def load_artifact(directory: str | os.PathLike, model: ModelIdentity | None = None) -> Artifact:
    """Read and verify an artifact; with `model`, also check it was fitted on that model."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory} is not a thresher artifact: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
        identity = ModelIdentity(**manifest["model"])
        family_of(identity.architecture)
        files, levels, method = manifest["files"], [float(x) for x in manifest["levels"]], manifest["method"]
    except (json.JSONDecodeError, KeyError, TypeError, UnsupportedArchitecture) as exc:
        raise ArtifactError(f"{manifest_path} is damaged: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path} has format {manifest.get('format')}; this thresher reads "
                            f"{FORMAT_VERSION}")
    for file_name, expected in files.items():
        file_path = directory / file_name
        if not file_path.is_file():
            raise ArtifactError(f"artifact file {file_path} is missing")
        if _sha256(file_path) != expected:
            raise ArtifactError(f"artifact file {file_path} is damaged: its sha256 does not match the manifest")
    try:
        thresholds = load_file(directory / THRESHOLDS)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {directory / THRESHOLDS}: {exc}") from exc
    artifact = Artifact(identity, levels, method, thresholds, manifest.get("calibration", {}), directory)
    artifact.validate()
    if model is not None:
        artifact.check_model(model)
    return artifact
