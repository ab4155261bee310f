"""Load test of an OpenAI-compatible thresher server: streaming chat with plain, sparse and steered requests.

Headless, bounded in time and requests, stops by itself, CSV and HTML reports:

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 16 -r 16 -t 60s \\
        --csv results/load --html results/load.html --mix plain=0.5,sparse=0.3,steered=0.2

Besides each request, locust records `TTFT` (time to first token) and `ITL` (inter-token latency) per request kind.
`--rate R` switches from fixed concurrency (each user sends back to back) to a fixed rate of R requests per
second per user. With `--expect FILE` (JSON: prompt -> greedy answer alone), plain greedy requests on those
prompts must reproduce their solo answers under load: a mismatch is a failure ("steering leak").
"""

from __future__ import annotations

import json
import random
import threading
import time

from locust import HttpUser, constant, constant_throughput, events, task

WORDS = ("river mountain history science music city language animal ocean garden winter machine story "
         "planet bridge forest market energy school island").split()
_lock = threading.Lock()
_sent = 0


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("thresher")
    group.add_argument("--model", default="SmolLM2-135M-Instruct", help="Model id the server serves.")
    group.add_argument("--api-key", default="", help="Bearer key, if the server requires one.")
    group.add_argument("--mix", default="plain=0.5,sparse=0.3,steered=0.2",
                       help="Share of request kinds: plain, sparse, steered.")
    group.add_argument("--sparsity", type=float, default=0.5, help="Level of the sparse requests.")
    group.add_argument("--steering-vectors", default="formal,positive,terse",
                       help="Vectors the steered requests pick from.")
    group.add_argument("--prompt-words", default="8,64", help="Uniform range of prompt lengths, in words.")
    group.add_argument("--output-tokens", default="16,64", help="Uniform range of max_tokens.")
    group.add_argument("--rate", type=float, default=0.0,
                       help="Requests per second per user (fixed-rate mode); 0: fixed concurrency.")
    group.add_argument("--max-requests", type=int, default=0, help="Stop after this many requests (0: no limit).")
    group.add_argument("--expect", default="", help="JSON file: prompt -> solo greedy answer to check under load.")


def _range(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


class ChatUser(HttpUser):
    def wait_time(self):
        rate = self.environment.parsed_options.rate
        return (constant_throughput(rate) if rate > 0 else constant(0))(self)

    def on_start(self):
        options = self.environment.parsed_options
        self.options = options
        self.kinds, self.weights = zip(*((k, float(w)) for k, w in (p.split("=") for p in options.mix.split(","))))
        self.expected = json.load(open(options.expect)) if options.expect else {}
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}

    def _body(self, kind: str) -> tuple[dict, str | None]:
        options = self.options
        if kind == "plain" and self.expected and random.random() < 0.5:
            prompt = random.choice(list(self.expected))
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0.0}
            return body, self.expected[prompt]
        prompt = " ".join(random.choices(WORDS, k=random.randint(*_range(options.prompt_words))))
        body = {"messages": [{"role": "user", "content": f"Write about: {prompt}"}],
                "max_tokens": random.randint(*_range(options.output_tokens)), "temperature": 0.7}
        if kind == "sparse":
            body["sparsity"] = options.sparsity
        elif kind == "steered":
            name = random.choice(options.steering_vectors.split(","))
            body["steering"] = {"vectors": [{"name": name, "strength": round(random.uniform(0.5, 2.0), 2)}]}
        return body, None

    @task
    def chat(self):
        global _sent
        options = self.options
        with _lock:
            if options.max_requests and _sent >= options.max_requests:
                self.environment.runner.quit()
                return
            _sent += 1
        kind = random.choices(self.kinds, self.weights)[0]
        body, expected = self._body(kind)
        body.update(model=options.model, stream=True)
        started = time.perf_counter()
        token_times, text = [], []
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              name=f"chat {kind}", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    response.failure(f"error in stream: {event['error']['message']}")
                    return
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        token_times.append(time.perf_counter())
                        text.append(choice["delta"]["content"])
            if not token_times:
                response.failure("the stream carried no tokens")
                return
            if expected is not None and "".join(text) != expected:
                response.failure(f"steering leak: a plain greedy answer under load differs from its solo answer "
                                 f"({''.join(text)!r} != {expected!r})")
                return
            response.success()
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name=kind, response_time=(token_times[0] - started) * 1000, response_length=0,
             exception=None, context={})
        for before, after in zip(token_times, token_times[1:]):
            fire(request_type="ITL", name=kind, response_time=(after - before) * 1000, response_length=0,
                 exception=None, context={})
