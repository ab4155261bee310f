"""The plugin on a CUDA vLLM (GPU machine only): torch.compile + CUDA graphs, the Triton path for small decode
batches, levels and steering per request, under both of vLLM's model runners (V1, and V2, vLLM 0.26's default), and
on vLLM's online FP8 weights (`--quantization fp8`: the Triton kernel reads FP8 rows, vLLM's FP8 GEMM the rest).
A 4-layer Llama-3-8B-shaped model with dummy weights and a synthetic artifact: level 1 thresholds are 0 (every
activation kept), level 2 thresholds are huge (every activation zeroed); a random SAE and vector after layer 2 steer.
"""

import json
import os

import pytest
import torch

from thresher.artifact import Artifact, dense_thresholds, model_identity
from thresher.engine import SPARSITY_EXTRA_ARG, engine_overrides, request_extras
from thresher.sae import SparseAutoencoder
from thresher.steering import SteeringAssets, save_steering_assets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and CUDA vLLM")
# this process has initialised CUDA (the skip check above), so vLLM's engine process must not be forked from it
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


# vLLM's two model runners with thresher's sparsity meter on (which keeps the unfused layer: it reads every
# projection's input), and V2 without it: the fused layer that serving runs, on bf16 and on FP8 weights
@pytest.fixture(scope="module", params=["v1", "v2", "v2-fused", "v2-fused-fp8"])
def gpu_llm(tmp_path_factory, request):
    from vllm import LLM

    model = tmp_path_factory.mktemp("llama8b-shape")
    (model / "config.json").write_text(json.dumps(CONFIG))
    identity = model_identity(model, "llama8b-shape")
    thresholds = dense_thresholds(identity, 3)
    for table in thresholds.values():
        table[2] = 1e9
    artifact = tmp_path_factory.mktemp("artifact")
    _write_synthetic_steering(artifact, CONFIG["hidden_size"], layer=2)
    Artifact(identity, [0.0, 0.25, 0.99], "synthetic", thresholds).save(artifact)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THRESHER_MEASURE_SPARSITY", "0" if "fused" in request.param else "1")
        patch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0" if request.param == "v1" else "1")
        llm = LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=512, max_num_seqs=4, gpu_memory_utilization=0.3, seed=0,
                  quantization="fp8" if request.param.endswith("fp8") else None,
                  hf_overrides=engine_overrides(model, artifact),
                  worker_extension_cls="thresher.engine.measurement.ThresherWorkerExtension")
    llm.thresher_artifact = artifact
    llm.thresher_fused = "fused" in request.param
    assert llm.collective_rpc("thresher_fused_layers")[0] == (CONFIG["num_hidden_layers"] if llm.thresher_fused else 0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _write_synthetic_steering(artifact, hidden: int, layer: int) -> None:
    torch.manual_seed(0)
    catalog = [{"id": i, "label": f"f{i}", "density": 0.1, "mean_activation": 1.0, "top_tokens": [],
                "top_contexts": []} for i in range(64)]
    save_steering_assets(artifact, SparseAutoencoder(hidden, 64, 8, layer), catalog, {"push": torch.randn(hidden)},
                         {"push": {"layer": layer, "norm": 64.0, "suggested_strength": 1.0}})


def _generate(llm, levels, tokens=16):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(range(10 + i, 40 + i))) for i in range(len(levels))]
    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                             extra_args={SPARSITY_EXTRA_ARG: level}) for level in levels]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _sparsity(llm):
    return llm.collective_rpc("thresher_decode_sparsity")[0]


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_levels_reach_the_kernels_under_cuda_graphs(gpu_llm, batch):
    if gpu_llm.thresher_fused:
        pytest.skip("the sparsity meter runs the unfused layer")
    _sparsity(gpu_llm)
    kept = _generate(gpu_llm, [0.25] * batch)
    assert _sparsity(gpu_llm) < 1e-4  # only activations that are exactly zero in bf16
    zeroed = _generate(gpu_llm, [0.99] * batch)
    assert _sparsity(gpu_llm) == pytest.approx(1.0)
    # dummy weights make a degenerate model (it repeats itself either way), so the meter is the evidence here
    assert all(len(t) == 16 for t in kept + zeroed)


def test_a_kept_level_matches_level_zero(gpu_llm):
    # level 0.25 here keeps every activation, like level 0: same function, same kernels, same tokens
    assert _generate(gpu_llm, [0.25]) == _generate(gpu_llm, [0.0])


@pytest.mark.parametrize("batch", [2, 4])
def test_a_mixed_batch_gives_each_request_its_own_tokens(gpu_llm, batch):
    # batch 2 runs the Triton kernels (per-row levels inside the compaction), batch 4 the dense path (per-row levels
    # in the producer kernel, then cuBLAS)
    # (dummy weights make a degenerate model whose tokens barely depend on the level: per-row levels inside the
    # fused kernels are checked against the reference at real shapes in tests/kernels)
    levels = [0.0, 0.99] * (batch // 2)
    mixed = _generate(gpu_llm, levels)
    dense, zeroed = _generate(gpu_llm, [0.0] * batch), _generate(gpu_llm, [0.99] * batch)
    assert mixed == [dense[i] if level == 0.0 else zeroed[i] for i, level in enumerate(levels)]


def _steered(llm, specs, tokens=16):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    for i, spec in enumerate(specs):
        extra_args, salt = request_extras(0.0, spec)
        prompt = TokensPrompt(prompt_token_ids=list(range(10 + i, 40 + i)))
        if salt:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args))
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_steering_under_cuda_graphs_touches_only_its_own_requests(gpu_llm):
    assets = SteeringAssets(gpu_llm.thresher_artifact, CONFIG["hidden_size"])
    push = assets.parse({"vectors": [{"name": "push", "strength": 50.0}], "features": [{"id": 3, "strength": 50.0}]})
    other = assets.parse({"vectors": [{"name": "push", "strength": -50.0}]})
    plain = _steered(gpu_llm, [None] * 4)
    mixed = _steered(gpu_llm, [None, push, other, push])
    # same batch shape, so the same kernels: the unsteered row is bit-identical, the steered rows change
    assert mixed[0] == plain[0]
    assert mixed[1] != plain[1] and mixed[2] != plain[2]


def test_clamps_under_cuda_graphs_set_the_feature_and_touch_only_their_own_requests(gpu_llm):
    """bf16 model, float32 clamp tables: the clamp runs inside the captured graphs and, where the meter is on,
    the SAE reads the clamp value after it."""
    assets = SteeringAssets(gpu_llm.thresher_artifact, CONFIG["hidden_size"])
    clamp = assets.parse({"features": [{"id": 3, "clamp": 40.0}]})
    plain = _steered(gpu_llm, [None] * 4)
    gpu_llm.collective_rpc("thresher_clamp_readings")
    mixed = _steered(gpu_llm, [None, clamp, None, clamp])
    assert mixed[0] == plain[0] and mixed[2] == plain[2]
    assert mixed[1] != plain[1] and mixed[3] != plain[3]
    if not gpu_llm.thresher_fused:
        readings = gpu_llm.collective_rpc("thresher_clamp_readings")[0]
        assert readings["largest_error_after"] < 0.05 * 40.0, readings
