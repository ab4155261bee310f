"""Prometheus metrics of one server: requests, latencies, time to first token, tokens, levels, steering, attention
budgets and the KV pages they read, errors."""

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
        self.attention_budget = Counter("thresher_requests_by_attention_budget",
                                        "Requests by attention budget (KV tokens per decode step, rounded up to a "
                                        "power of two; 0 = dense)",
                                        ["budget"], registry=r)
        self.pages_read = Counter("thresher_attention_pages_read",
                                  "KV-cache pages read by decode steps under an attention budget (per sequence and "
                                  "step, in every layer)", registry=r)
        self.pages_dense = Counter("thresher_attention_pages_dense",
                                   "KV-cache pages dense attention would have read in those steps (per sequence "
                                   "and step)", registry=r)
        self.pages_read_fraction = Gauge("thresher_attention_pages_read_fraction",
                                         "Fraction of KV-cache pages read by the budgeted decode steps between the "
                                         "last two scrapes that saw any", registry=r)
        self.steering = Counter("thresher_steered_requests", "Requests by steering kind", ["kind"], registry=r)
        self.running = Gauge("thresher_running_requests", "Requests in the engine now", registry=r)
        self.aborted = Counter("thresher_aborted_requests", "Requests aborted because the client went away",
                               registry=r)
        self.errors = Counter("thresher_errors", "Error responses by type and status", ["type", "status"],
                              registry=r)

    def count_request_kind(self, applied) -> None:
        self.sparsity.labels(level=f"{applied.sparsity:g}").inc()
        budget = applied.attention.budget
        # a bounded label set: the power of two at or above the budget
        self.attention_budget.labels(budget=str(1 << (budget - 1).bit_length() if budget else 0)).inc()
        steering = applied.steering
        if steering is None or steering.is_empty():
            self.steering.labels(kind="none").inc()
            return
        if steering.features:
            self.steering.labels(kind="features").inc()
        if steering.vectors:
            self.steering.labels(kind="vectors").inc()

    def count_error(self, error) -> None:
        self.errors.labels(type=error.type, status=str(error.status)).inc()

    def count_pages(self, read: int, dense: int) -> None:
        self.pages_read.inc(read)
        self.pages_dense.inc(dense)
        if dense:
            self.pages_read_fraction.set(read / dense)

    def render(self) -> bytes:
        return generate_latest(self.registry)
