"""Sparse autoencoders on one layer's residual stream, in the SAELens on-disk layout.

    cfg.json                  d_in, d_sae, architecture ("topk", "standard" = ReLU, "jumprelu"), k, hook_layer, ...
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ threshold)

thresher trains TopK SAEs (`calibration/sae_training.py`); SAEs trained elsewhere in this layout load too, so their
decoder rows can steer and their encoders can label and measure features.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
ARCHITECTURES = ("topk", "standard", "jumprelu")


class SAEError(ValueError):
    """An SAE that cannot be read, or does not fit the model it is used with."""


class SparseAutoencoder(torch.nn.Module):
    """encode(x) = act((x - b_dec) @ W_enc + b_enc); decode(z) = z @ W_dec + b_dec."""

    def __init__(self, d_in: int, d_sae: int, k: int | None, hook_layer: int, architecture: str = "topk",
                 model_name: str = ""):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SAEError(f"SAE architecture {architecture!r} is not supported; expected one of {ARCHITECTURES}")
        if architecture == "topk" and not (k and 0 < k <= d_sae):
            raise SAEError(f"a TopK SAE needs 0 < k <= d_sae ({d_sae}), got k={k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.hook_layer, self.architecture, self.model_name = hook_layer, architecture, model_name
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.register_buffer("threshold", torch.zeros(d_sae))
        torch.nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.t())

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        # (x - b_dec) @ W_enc + b_enc, with b_dec folded into the bias: the same function, but training backpropagates
        # to b_dec through one vector-matrix product instead of a [tokens, d_sae] x [d_sae, d_in] matmul
        return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """decode() of codes given as `[tokens, n]` latent indices and values: reads n decoder rows per token."""
        rows = torch.nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return rows + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def config(self, dtype: torch.dtype = torch.float32) -> dict:
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "hook_name": f"blocks.{self.hook_layer}.hook_resid_post",
            "hook_layer": self.hook_layer,
            "model_name": self.model_name,
            "dtype": str(dtype).removeprefix("torch."),
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
        }

    def save(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the SAELens layout with weights in `dtype` (loading always computes in float32)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG).write_text(json.dumps(self.config(dtype), indent=2) + "\n")
        save_file({name: t.detach().to(dtype).contiguous() for name, t in self.state_dict().items()},
                  directory / WEIGHTS)
        return directory


def load_sae(directory: str | os.PathLike, d_in: int | None = None) -> SparseAutoencoder:
    """Read an SAE in the SAELens layout; with `d_in`, fail unless it reads residuals of that width."""
    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG).read_text())
        weights = load_file(directory / WEIGHTS)
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise SAEError(f"{directory} is not a readable SAE ({CONFIG} + {WEIGHTS}): {exc}") from exc
    architecture = cfg.get("architecture", "standard")
    try:
        sae_d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        layer = int(cfg.get("hook_layer", cfg.get("hook_name", "blocks.-1").split(".")[1]))
    except (KeyError, ValueError, IndexError) as exc:
        raise SAEError(f"{directory / CONFIG} lacks d_in, d_sae or the hook layer: {exc}") from exc
    if d_in is not None and sae_d_in != d_in:
        raise SAEError(f"SAE {directory} reads residuals of width {sae_d_in}, but the model's hidden size is {d_in}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    # float32 whatever torch's default dtype (vLLM builds models under theirs)
    sae = SparseAutoencoder(sae_d_in, d_sae, k, layer, architecture, cfg.get("model_name", "")).float()
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    for name, shape in expected.items():
        if name not in weights:
            raise SAEError(f"{directory / WEIGHTS} lacks {name}")
        if tuple(weights[name].shape) != shape:
            raise SAEError(f"{directory / WEIGHTS}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    sae.load_state_dict({name: weights[name].float() for name in expected})
    return sae
