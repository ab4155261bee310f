"""Helpers shared by tests."""

import os
import subprocess
import sys


def run_thresher(*args: str) -> subprocess.CompletedProcess:
    """The real `thresher` command line, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=900, env=os.environ.copy()
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feature_activation(model, sae, token_ids: list[int], start: int, feature: int) -> float:
    """Mean activation of SAE `feature` over `token_ids[start:]`, read by a plain (unsteered) transformers forward."""
    import torch

    with torch.no_grad():
        hidden = model.model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states[sae.hook_layer + 1]
        return float(sae.encode(hidden[0, start:].float())[:, feature].mean())
