"""Decode throughput with every request steered differently, against none steered, on one engine in one run.

    python bench/steering.py --artifact ARTIFACT [--model MODEL] [--batches 1,16] [--new-tokens 128] [--out FILE]

Both workloads run on the same thresher engine (compiled; CUDA graphs on a GPU), interleaved over `--repeats`
rounds so drift hits both alike; greedy, 32-token prompts, `ignore_eos`. Each steered request gets its own spec
(a named vector at its own strength plus an SAE feature), so the batch holds as many distinct specs as requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

from thresher.engine import engine_overrides, request_extras  # noqa: E402
from thresher.models import resolve_model  # noqa: E402
from thresher.steering import SteeringAssets  # noqa: E402

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


def _tokens_per_second(llm, prompts, params) -> float:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from vllm import LLM

    resolved = resolve_model(args.model)
    assets = SteeringAssets(args.artifact, resolved.config()["hidden_size"])
    if not assets.available:
        raise SystemExit(f"{args.artifact} has no SAE or vectors to steer with")
    on_gpu = torch.cuda.is_available()
    llm = LLM(model=str(resolved.path), hf_overrides=engine_overrides(resolved.path, args.artifact),
              max_model_len=512, max_num_seqs=16, seed=0, gpu_memory_utilization=0.85 if on_gpu else 0.3)
    results = {"device": torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)",
               "model": resolved.name, "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens, "batches": {}}
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
