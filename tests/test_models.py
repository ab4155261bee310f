import json

import pytest
import torch

from thresher.models import DEFAULT_MODEL_NAME, ModelError, resolve_model


def test_embedded_default_resolves_to_a_llama_folder(embedded_model):
    assert embedded_model.name == DEFAULT_MODEL_NAME
    assert embedded_model.architecture == "LlamaForCausalLM"
    config = embedded_model.config()
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert any(embedded_model.path.glob("*.safetensors"))


def test_embedded_default_is_converted_once(embedded_model):
    before = (embedded_model.path / "config.json").stat().st_mtime_ns
    again = resolve_model("default")
    assert again.path == embedded_model.path
    assert (again.path / "config.json").stat().st_mtime_ns == before


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_model(weights)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x07" * 64)
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        resolve_model(broken)


def test_unsupported_architecture_is_rejected_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM.*Qwen2ForCausalLM, "
                                         "Qwen3ForCausalLM"):
        resolve_model(tmp_path)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)


def test_tensor_parallel_sizes_follow_the_heads(embedded_model):
    # 9 query heads and 3 KV heads: 2 ranks cannot split them (vLLM refuses it when the engine starts)
    assert embedded_model.tensor_parallel_sizes() == [1, 3, 9]
    with pytest.raises(ModelError, match="--tensor-parallel-size 2: SmolLM2-135M-Instruct has 9 query and 3 KV heads, "
                                         "which vLLM can shard over 1, 3, 9 ranks only"):
        embedded_model.check_tensor_parallel_size(2)


def test_serve_refuses_a_tensor_parallel_size_before_starting_anything(embedded_model):
    from tests.helpers import run_thresher

    result = run_thresher("serve", "--tensor-parallel-size", "2", "--port", "1")
    assert result.returncode == 2
    assert "which vLLM can shard over 1, 3, 9 ranks only" in result.stderr
    assert "serving" not in result.stderr


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--attention-budget", "64"], "--attention-budget: must be 0 (dense attention) or at least 128, got 64"),
    (["--attention-budget", "256", "--no-attention-budgets"],
     "--attention-budget: a default budget (256) needs attention budgets"),
    (["--engine-arg", "quantization=fp8"], "--engine-arg: quantization: use --quantization"),
    (["--engine-arg", "kv_cache_dtype=fp8"],
     "--engine-arg: kv_cache_dtype=fp8: thresher serves KV caches in the model's dtype only"),
    (["--quantization", "awq"], "--quantization: expected one of fp8, got 'awq'"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: must lie in (0, 1], got 1.5"),
    (["--max-num-seqs", "0"], "'--max-num-seqs': Input should be greater than or equal to 1"),
    pytest.param(["--quantization", "fp8"], "--quantization: fp8 weights need a CUDA GPU (vLLM's CPU backend has no "
                 "FP8 linear layers)", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU refusal")),
])
def test_serve_refuses_settings_it_cannot_apply(arguments, expected):
    from tests.helpers import run_thresher

    result = run_thresher("serve", *arguments, "--port", "1")
    assert result.returncode == 2
    message = " ".join(result.stderr.replace("│", " ").split())  # rich wraps the error in a box
    assert f"Invalid value for {expected}" in message
    assert "serving" not in result.stderr


def test_serve_refuses_a_quantized_checkpoint_before_calibrating_it(tmp_path):
    from tests.helpers import build_tiny_model, run_thresher

    build_tiny_model("LlamaForCausalLM", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run_thresher("serve", "--model", str(tmp_path), "--port", "1")
    assert result.returncode == 2
    assert "is a quantized checkpoint: thresher serves unquantized checkpoints only" in result.stdout + result.stderr
    assert "calibrat" not in (result.stdout + result.stderr).lower()
