"""One real `thresher serve` process for the server and load tests (started once, stopped at the end)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.helpers import free_port, stop_process_group

API_KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    # what /health and a chat request answered while the engine was starting
    startup_statuses: list[int] = field(default_factory=list)
    startup_chat_status: int | None = None

    @property
    def api(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.api, api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples whose line starts with `name`."""
        text = httpx.get(f"{self.base_url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="session")
def server(embedded_model, tmp_path_factory):
    """`thresher serve` as `make serve` runs it: the embedded model with its shipped reference artifact."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    command = [sys.executable, "-m", "thresher", "serve", "--port", str(port),
               "--api-key", API_KEY, "--max-model-len", "512", "--max-num-seqs", "16", "--dtype", "float32",
               "--kv-cache-gib", "0.25"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                   start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"thresher serve exited early:\n{log.read_text()[-4000:]}"
            try:
                status = httpx.get(f"{server.base_url}/health", timeout=5).status_code
            except httpx.TransportError:
                time.sleep(1)
                continue
            server.startup_statuses.append(status)
            if status == 200:
                break
            if server.startup_chat_status is None:
                server.startup_chat_status = httpx.post(
                    f"{server.api}/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=30).status_code
            time.sleep(1)
        else:
            pytest.fail(f"the server was not healthy within 10 minutes:\n{log.read_text()[-4000:]}")
        yield server
    finally:
        stop_process_group(process)
