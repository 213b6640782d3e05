"""Prometheus metrics, vLLM's set under our own prefix. One registry per app, never global."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "neuronserve:"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_SPARSITY_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting for a slot.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache positions in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter(PREFIX + "request_success", "Finished sequences by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.",
                             _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.",
                                    _LATENCY_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length per sequence.", _TOKEN_BUCKETS)
        self.generation_len = histogram("request_generation_tokens", "Generated tokens per sequence.",
                                        _TOKEN_BUCKETS)
        self.request_sparsity = histogram(
            "request_sparsity_achieved", "WINA sparsity achieved per sequence: the share of projection "
            "weights its tokens skipped (0 for dense requests).", _SPARSITY_BUCKETS)

        self._interventions = Counter(
            PREFIX + "intervention_requests", "Requests that applied an intervention, by type and "
            "profile (SAE id, vector name or profile name).", labels + ["type", "profile"], registry=r)

    def intervention_requested(self, entry: dict) -> None:
        """entry: one applied request entry (RowInterventions.applied)."""
        profile = entry.get("profile") or entry.get("sae") or entry.get("vector") or ""
        self._interventions.labels(self.model_name, entry["type"], profile).inc()

    def request_finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()
