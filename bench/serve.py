"""Serving latency and throughput of a running thresher server, dense against sparse, at several concurrencies.

    thresher serve &            # or any OpenAI-compatible thresher server
    python bench/serve.py --host http://127.0.0.1:8000 --users 1,4,16 --sparsity 0.5 --seconds 60 \\
        --out bench/results/serve.json

For each concurrency it runs the locust workload (`loadtests/locustfile.py`, streaming chat) twice, all dense then
all sparse, and reports time to first token, inter-token latency (p50/p99) and output tokens per second.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"


def run_locust(host: str, users: int, kind: str, sparsity: float, seconds: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
                        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "60",
                        "--csv", str(prefix), "--only-summary", "--mix", f"{kind}=1", "--sparsity", str(sparsity),
                        *extra], check=True, capture_output=True)
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(Path(f"{prefix}_stats.csv").open())}
    request, ttft, itl = rows[("POST", f"chat {kind}")], rows[("TTFT", kind)], rows[("ITL", kind)]
    tokens = int(itl["Request Count"]) + int(ttft["Request Count"])  # one token per stream event
    return {
        "requests": int(request["Request Count"]), "failures": int(request["Failure Count"]),
        "ttft_ms_p50": float(ttft["50%"]), "ttft_ms_p99": float(ttft["99%"]),
        "itl_ms_p50": float(itl["50%"]), "itl_ms_p99": float(itl["99%"]),
        "output_tokens_per_s": round(tokens / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--users", default="1,4,16")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("locust_args", nargs="*", help="passed to the locustfile, e.g. --api-key KEY")
    args = parser.parse_args()
    results = {"host": args.host, "seconds": args.seconds, "sparsity": args.sparsity, "runs": []}
    for users in (int(u) for u in args.users.split(",")):
        for kind in ("plain", "sparse"):
            run = {"users": users, "kind": "dense" if kind == "plain" else f"sparse {args.sparsity}",
                   **run_locust(args.host, users, kind, args.sparsity, args.seconds, args.locust_args)}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
