"""Server overhead: thresher's server against vLLM's own OpenAI server, same engine settings, same prompts.

    python bench/server_overhead.py --artifact ARTIFACT [--requests 20] [--max-tokens 32] [--order vllm,thresher,...]
        [--out FILE]

Both servers run the thresher engine (vLLM's through `--hf-overrides`), eager, float32, at 64 sequences, on the
embedded model, one at a time in the order `--order` (default vLLM, thresher, vLLM, thresher, so drift hits both
alike); each gets a warm-up and then the same sequential greedy completions (`ignore_eos`, fixed length). Prints
each run's mean and median latency, and the ratio of thresher's to vLLM's (each averaged over its runs). Two
servers alive at once on a 2-core machine disturb each other far more than 5% (their idle engine processes still
compete for the cores), hence one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from thresher.engine import engine_overrides
from thresher.models import resolve_model

PORT = 8123


def _serve(command: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(f"server did not start: {' '.join(command)}")


def _latencies(model: str, requests: int, max_tokens: int) -> list[float]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(requests + 2):
            started = time.perf_counter()
            response = client.post(f"http://127.0.0.1:{PORT}/v1/completions",
                                   json={**body, "prompt": f"Fact number {i % 5} about rivers:"})
            response.raise_for_status()
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, type=Path)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--order", default="vllm,thresher,vllm,thresher")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    resolved = resolve_model(None)
    name = resolved.name
    common = ["--port", str(PORT), "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
              "--gpu-memory-utilization", "0.2", "--max-num-seqs", "64", "--served-model-name", name]
    servers = {
        "thresher": [sys.executable, "-m", "thresher", "serve", "--artifact", str(args.artifact), *common],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolved.path),
                 "--hf-overrides", json.dumps(engine_overrides(resolved.path, args.artifact)), *common],
    }
    results = {"requests": args.requests, "max_tokens": args.max_tokens, "runs": []}
    for label in args.order.split(","):
        process = _serve(servers[label])
        try:
            times = _latencies(name, args.requests, args.max_tokens)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        run = {"server": label, "mean_s": round(statistics.mean(times), 4),
               "median_s": round(statistics.median(times), 4)}
        results["runs"].append(run)
        print(f"{label}: mean latency {run['mean_s']:.3f} s, median {run['median_s']:.3f} s", flush=True)
    for stat in ("mean_s", "median_s"):
        thresher = statistics.mean(r[stat] for r in results["runs"] if r["server"] == "thresher")
        vllm = statistics.mean(r[stat] for r in results["runs"] if r["server"] == "vllm")
        results[f"ratio_{stat[:-2]}"] = round(thresher / vllm, 4)
    print(f"thresher / vLLM latency: mean {results['ratio_mean']:.3f}, median {results['ratio_median']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
