"""Shared fixtures: one converted embedded model and one small calibrated artifact for the whole session.

Without a GPU, Triton kernels run in Triton's interpreter. `triton.jit` picks the interpreter when a kernel is
defined, so TRITON_INTERPRET is set here, before any test module (whatever it imports) is collected.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import run_thresher  # noqa: E402


@pytest.fixture(scope="session")
def thresher_home(tmp_path_factory) -> Path:
    """The cache for converted models: $THRESHER_HOME when set (CI sets it), else a session temp dir."""
    home = os.environ.get("THRESHER_HOME")
    path = Path(home) if home else tmp_path_factory.mktemp("thresher-home")
    os.environ["THRESHER_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def embedded_model(thresher_home):
    from thresher.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def hf_model(embedded_model):
    from thresher.models import load_hf_model

    return load_hf_model(embedded_model)


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory, embedded_model) -> Path:
    """The embedded model calibrated on 1024 tokens at 25% and 50% (50% then refined end to end for 4 steps), an SAE
    on 8k text tokens in two views (4 epochs: the step count of 8 epochs over one view), fine-tuned end to end on 2k,
    and a quick report."""
    out = tmp_path_factory.mktemp("artifact")
    result = run_thresher("calibrate", "--out", str(out), "--levels", "0.25,0.5", "--max-tokens", "1024",
                          "--eval-tokens", "512", "--sae-tokens", "8192", "--sae-epochs", "4",
                          "--sae-finetune-tokens", "2048", "--refine-tokens", "2048")
    assert result.returncode == 0, result.stderr
    return out
