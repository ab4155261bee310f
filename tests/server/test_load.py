"""A short locust run against the real server: no failed request, and plain greedy answers under mixed load
(sparse and steered neighbours) equal their solo answers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from tests.server.conftest import API_KEY, MODEL

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"
SPOT_CHECK_PROMPTS = ["What is the capital of Italy?", "Give me a word that rhymes with cat.",
                      "How many legs does a spider have?"]


def test_mixed_load_has_no_failures_and_no_steering_leaks(server, tmp_path):
    client = server.client()
    solo = {prompt: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=16, temperature=0.0).choices[0].message.content
            for prompt in SPOT_CHECK_PROMPTS}
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps(solo))
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", server.base_url,
         "-u", "8", "-r", "8", "-t", "45s", "--stop-timeout", "30", "--csv", str(tmp_path / "load"),
         "--html", str(tmp_path / "load.html"), "--api-key", API_KEY, "--model", MODEL, "--expect", str(expect),
         "--output-tokens", "8,32", "--only-summary"],
        capture_output=True, text=True, timeout=300)
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader((tmp_path / "load_stats.csv").open())}
    failures = (tmp_path / "load_failures.csv").read_text()
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{failures}"
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) >= 20 and int(total["Failure Count"]) == 0, failures
    assert {("POST", "chat plain"), ("POST", "chat sparse"), ("POST", "chat steered")} <= set(rows)
    assert float(rows[("TTFT", "plain")]["50%"]) > 0 and int(rows[("ITL", "steered")]["Request Count"]) > 0
    assert (tmp_path / "load.html").stat().st_size > 0
