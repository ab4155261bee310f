"""Decode throughput with every request steered differently, against none steered, on one engine in one run.

    python bench/steering.py --artifact ARTIFACT [--model MODEL] [--batches 1,16] [--new-tokens 128] [--out FILE]
    python bench/steering.py --dummy-llama3-8b [--batches 1,16] [--out FILE]       # GPU machine, no model needed

Both workloads run on the same thresher engine (compiled; CUDA graphs on a GPU), interleaved over `--repeats`
rounds so drift hits both alike; greedy, 32-token prompts, `ignore_eos`. Each steered request gets its own spec
(a named vector at its own strength plus an SAE feature), so the batch holds as many distinct specs as requests.
`--dummy-llama3-8b` runs the Llama-3-8B shape with dummy bf16 weights and a synthetic artifact (dense thresholds,
a random 256-latent SAE and three random vectors after layer 16): steering's cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

import torch  # noqa: E402

from thresher.artifact import Artifact, dense_thresholds, model_identity  # noqa: E402
from thresher.engine import engine_overrides, request_extras  # noqa: E402
from thresher.models import resolve_model  # noqa: E402
from thresher.sae import SparseAutoencoder  # noqa: E402
from thresher.steering import SteeringAssets, save_steering_assets  # noqa: E402

PROMPT_TOKENS = 32


def _requests(batch: int, assets: SteeringAssets | None, new_tokens: int):
    from vllm import SamplingParams

    names = sorted(assets.vector_info) if assets else []
    prompts, params = [], []
    for i in range(batch):
        spec = None
        if assets is not None:
            spec = assets.parse({"vectors": [{"name": names[i % len(names)], "strength": 0.5 + i / batch}],
                                 "features": [{"id": i, "strength": 2.0}]})
        extra_args, salt = request_extras(0.0, spec)
        prompt = {"prompt_token_ids": [100 + (7 * i + j) % 5000 for j in range(PROMPT_TOKENS)]}
        if salt:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args))
    return prompts, params


def _dummy_llama3_8b(root: Path) -> tuple[Path, Path]:
    """A config-only Llama-3-8B folder and a synthetic artifact with steering assets after layer 16."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import LLAMA3_8B

    model = root / "llama3-8b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    identity = model_identity(model, model.name)
    thresholds = dense_thresholds(identity, 1)
    artifact = root / "artifact"
    torch.manual_seed(0)
    hidden, d_sae = identity.hidden_size, 256
    catalog = [{"id": i, "label": f"f{i}", "density": 0.01, "mean_activation": 1.0, "top_tokens": [],
                "top_contexts": []} for i in range(d_sae)]
    names = ("formal", "positive", "terse")
    save_steering_assets(artifact, SparseAutoencoder(hidden, d_sae, 8, 16), catalog,
                         {name: torch.randn(hidden) for name in names},
                         {name: {"layer": 16, "norm": 64.0, "suggested_strength": 1.0} for name in names})
    Artifact(identity, [0.0], "synthetic", thresholds).save(artifact)
    return model, artifact


def _tokens_per_second(llm, prompts, params) -> float:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="a calibrated artifact with an SAE or vectors")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dummy-llama3-8b", action="store_true", help="synthetic 8B-shaped model and artifact")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from vllm import LLM

    if args.dummy_llama3_8b:
        model_path, artifact = _dummy_llama3_8b(Path(tempfile.mkdtemp()))
        model_name, engine_kwargs = "Llama-3-8B shape, dummy bf16 weights", {
            "load_format": "dummy", "skip_tokenizer_init": True, "dtype": "bfloat16"}
    elif args.artifact:
        resolved = resolve_model(args.model)
        model_path, artifact, model_name, engine_kwargs = resolved.path, args.artifact, resolved.name, {}
    else:
        parser.error("give --artifact or --dummy-llama3-8b")
    assets = SteeringAssets(artifact, json.loads((model_path / "config.json").read_text())["hidden_size"])
    if not assets.available:
        raise SystemExit(f"{artifact} has no SAE or vectors to steer with")
    on_gpu = torch.cuda.is_available()
    memory = {"gpu_memory_utilization": 0.85} if on_gpu else {"kv_cache_memory_bytes": 2**30}
    llm = LLM(model=str(model_path), hf_overrides=engine_overrides(model_path, artifact), max_model_len=512,
              max_num_seqs=16, seed=0, **memory, **engine_kwargs)
    results = {"device": torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)",
               "model": model_name, "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens, "batches": {},
               "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "vLLM's default")}
    for batch in (int(b) for b in args.batches.split(",")):
        workloads = {"unsteered": _requests(batch, None, args.new_tokens),
                     "all steered": _requests(batch, assets, args.new_tokens)}
        _tokens_per_second(llm, *workloads["unsteered"])  # warm-up
        rates = {name: [] for name in workloads}
        for _ in range(args.repeats):
            for name, (prompts, params) in workloads.items():
                rates[name].append(_tokens_per_second(llm, prompts, params))
        unsteered, steered = statistics.median(rates["unsteered"]), statistics.median(rates["all steered"])
        results["batches"][batch] = {"unsteered_tok_s": round(unsteered, 1), "steered_tok_s": round(steered, 1),
                                     "ratio": round(steered / unsteered, 3)}
        print(f"batch {batch:>2}: unsteered {unsteered:8.1f} tok/s, every request steered {steered:8.1f} tok/s "
              f"-> {steered / unsteered:.3f}x", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
