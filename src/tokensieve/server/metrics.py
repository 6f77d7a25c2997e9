"""Prometheus metrics under vLLM's names with a `tokensieve:` prefix, in a registry of the app's own."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..outputs import RequestOutput

PREFIX = "tokensieve:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)

# name, help, the engine.stats() key it reads
GAUGES = (
    ("num_requests_running", "Requests running (scheduled in the batch).", "running"),
    ("num_requests_waiting", "Requests waiting to be scheduled.", "waiting"),
    ("kv_cache_usage_perc", "Share of KV-cache blocks held by requests (0 to 1).", "kv_usage"),
)
COUNTERS = (
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("prompt_tokens", "Prompt tokens processed (computed or cached).", "prompt_tokens"),
    ("generation_tokens", "Tokens generated.", "generation_tokens"),
    ("num_preemptions", "Requests preempted to free KV blocks.", "preemptions"),
    ("spec_decode_num_draft_tokens", "Tokens drafted by speculative decoding.", "spec_draft_tokens"),
    ("spec_decode_num_accepted_tokens", "Drafted tokens accepted.", "spec_accepted_tokens"),
)


class _EngineStatsCollector:
    """Gauges and counters read from the engine thread's latest stats snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], dict | None], model_name: str):
        self._snapshot, self._model_name = snapshot, model_name

    def collect(self):
        stats = self._snapshot()
        if stats is None:  # the model is still loading
            return
        for kind, table in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
            for name, help_text, key in table:
                family = kind(PREFIX + name, help_text, labels=["model_name"])
                family.add_metric([self._model_name], stats[key])
                yield family


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict | None], model_name: str):
        """`snapshot` gives the engine's latest stats, or None while the model loads."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(snapshot, model_name))

        def histogram(name: str, help_text: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, help_text, ["model_name"], registry=self.registry, buckets=buckets).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Seconds from arrival to the first token.", LATENCY_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Seconds between a request's outputs.", TOKEN_GAP_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Seconds from arrival to the last token.", LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds", "Seconds from arrival to first scheduled.", LATENCY_BUCKETS)
        self._request_success = Counter(
            PREFIX + "request_success", "Requests finished, by reason.", ["model_name", "finished_reason"], registry=self.registry
        )
        self.embedding_requests = Counter(
            PREFIX + "embedding_requests", "Embedding requests answered.", ["model_name"], registry=self.registry
        )
        self._model_name = model_name

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.time_to_first_token is not None:
            self.time_to_first_token.observe(m.time_to_first_token)
        if m.queue_time is not None:
            self.request_queue_time.observe(m.queue_time)
        self.e2e_request_latency.observe(m.total_time)
        self._request_success.labels(self._model_name, out.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
