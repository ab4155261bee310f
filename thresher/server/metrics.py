"""Prometheus metrics of one server: requests, latencies, time to first token, tokens, levels, steering, errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("thresher_requests", "Completed requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("thresher_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("thresher_time_to_first_token_seconds", "Time to the first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("thresher_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("thresher_generation_tokens", "Tokens generated", registry=r)
        self.sparsity = Counter("thresher_requests_by_sparsity", "Requests by sparsity level", ["level"], registry=r)
        self.steering = Counter("thresher_steered_requests", "Requests by steering kind", ["kind"], registry=r)
        self.running = Gauge("thresher_running_requests", "Requests in the engine now", registry=r)
        self.aborted = Counter("thresher_aborted_requests", "Requests aborted because the client went away",
                               registry=r)
        self.errors = Counter("thresher_errors", "Error responses by type and status", ["type", "status"],
                              registry=r)

    def count_request_kind(self, sparsity: float, steering) -> None:
        self.sparsity.labels(level=f"{sparsity:g}").inc()
        if steering is None or steering.is_empty():
            self.steering.labels(kind="none").inc()
            return
        if steering.features:
            self.steering.labels(kind="features").inc()
        if steering.vectors:
            self.steering.labels(kind="vectors").inc()

    def count_error(self, error) -> None:
        self.errors.labels(type=error.type, status=str(error.status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
