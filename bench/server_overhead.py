"""Server overhead: thresher's server against vLLM's own OpenAI server, same engine settings, same prompts.

    python bench/server_overhead.py --artifact ARTIFACT [--requests 20] [--max-tokens 32] [--out FILE]

Both servers run the thresher engine (vLLM's through `--hf-overrides`), eager, float32, on the embedded model, one
after the other; each gets a warm-up and then the same sequential greedy completions (`ignore_eos`, fixed length).
Prints each server's mean latency and the ratio.
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
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    resolved = resolve_model(None)
    name = resolved.name
    common = ["--port", str(PORT), "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
              "--gpu-memory-utilization", "0.2", "--served-model-name", name]
    servers = {  # thresher first: a server started later finds warmer caches
        "thresher": [sys.executable, "-m", "thresher", "serve", "--artifact", str(args.artifact), *common],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolved.path),
                 "--hf-overrides", json.dumps(engine_overrides(resolved.path, args.artifact)), *common],
    }
    results = {"requests": args.requests, "max_tokens": args.max_tokens, "mean_latency_s": {}}
    for label, command in servers.items():
        process = _serve(command)
        try:
            results["mean_latency_s"][label] = round(statistics.mean(_latencies(name, args.requests,
                                                                                args.max_tokens)), 4)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        print(f"{label}: mean latency {results['mean_latency_s'][label]:.3f} s", flush=True)
    results["ratio"] = round(results["mean_latency_s"]["thresher"] / results["mean_latency_s"]["vllm"], 4)
    print(f"thresher / vLLM mean latency: {results['ratio']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
