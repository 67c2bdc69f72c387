"""The server's Prometheus metrics, served in the text format on their own HTTP port."""

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily

from rz.generation import Generation

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    """Counters, histograms and gauges of one server, in a registry of their own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        registry = self.registry
        self.requests = Counter(
            "rz_requests", "Requests by method and final gRPC status code", ["method", "status"], registry=registry
        )
        self.prompt_tokens = Counter("rz_prompt_tokens", "Prompt tokens of requests (cached ones included)", registry=registry)
        # Over a window, the prompt-cache hit rate is rate(rz_prompt_tokens_cached) / rate(rz_prompt_tokens);
        # rz_prompt_cache_hit_ratio is the same since the server started.
        self.prompt_tokens_cached = Counter(
            "rz_prompt_tokens_cached", "Prompt tokens copied from the KV cache instead of prefilled", registry=registry
        )
        self._prompt_totals = [0, 0]  # prompt tokens, cached ones: the hit ratio's terms
        self.prompt_cache_hit_ratio = Gauge(
            "rz_prompt_cache_hit_ratio", "Fraction of all prompt tokens so far that the KV cache served", registry=registry
        )
        self.prompt_cache_hit_ratio.set_function(lambda: self._prompt_totals[1] / max(self._prompt_totals[0], 1))
        self.generated_tokens = Counter("rz_generated_tokens", "Tokens generated", registry=registry)
        self.queue_wait = Histogram(
            "rz_queue_wait_seconds", "Time from arrival to getting a slot", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.time_to_first_token = Histogram(
            "rz_time_to_first_token_seconds", "Time from arrival to the first token", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.time_per_output_token = Histogram(
            "rz_time_per_output_token_seconds", "Decode time per token after the first, per request",
            buckets=_TOKEN_BUCKETS, registry=registry,
        )
        self.request_duration = Histogram(
            "rz_request_duration_seconds", "Time from arrival to the last token", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.slots = Gauge("rz_slots", "Decode slots (--max-batch)", registry=registry)
        self.active_slots = Gauge("rz_active_slots", "Decode slots holding a request", registry=registry)
        self.queued_requests = Gauge("rz_queued_requests", "Requests waiting for a slot", registry=registry)
        self.kv_cache_usage = Gauge(
            "rz_kv_cache_usage_ratio", "Fraction of the KV cache's positions holding a request's tokens", registry=registry
        )

        self.warm_up_pending = Gauge(
            "rz_warm_up_pending", "Warm-up units (shapes to compile) the engine loop has yet to run while idle",
            registry=registry,
        )

    def serve(self, port: int, host: str):
        """Start the HTTP endpoint; returns the server (its port: server.server_port)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    def watch_compilations(self, compilations: dict[str, float]) -> None:
        """Export the engine's compilation record (step name -> seconds) as it grows."""
        self.registry.register(_CompilationCollector(compilations))

    def watch_speculation(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Export counts() -> (tokens drafted, drafts kept) of speculative decoding at each scrape
        (vLLM's spec_decode_num_draft_tokens and spec_decode_num_accepted_tokens, rz_ prefixed)."""
        self.registry.register(_SpeculationCollector(counts))

    def watch_load(self, load: Callable[[], tuple[int, int, float]]) -> None:
        """Read the gauges of the moment from load() -> (active slots, queued requests, KV cache usage) at each scrape."""
        self.active_slots.set_function(lambda: load()[0])
        self.queued_requests.set_function(lambda: load()[1])
        self.kv_cache_usage.set_function(lambda: load()[2])

    def watch_warm_up(self, pending: Callable[[], int]) -> None:
        self.warm_up_pending.set_function(pending)

    def observe_request(self, method: str, status: str, sequence: Generation | None) -> None:
        """Count a request that ended with `status`; sequence is None if it never got a slot."""
        self.requests.labels(method, status).inc()
        if sequence is None:
            return
        self.prompt_tokens.inc(len(sequence.request.prompt_ids))
        self.prompt_tokens_cached.inc(sequence.n_cached)
        self._prompt_totals[0] += len(sequence.request.prompt_ids)
        self._prompt_totals[1] += sequence.n_cached
        self.generated_tokens.inc(len(sequence.output_ids))
        if status != "OK":
            return
        timings = sequence.timings
        self.queue_wait.observe(timings.started_at - timings.queued_at)
        self.time_to_first_token.observe(timings.first_token_at - timings.queued_at)
        self.request_duration.observe(timings.finished_at - timings.queued_at)
        if len(sequence.output_ids) > 1:
            self.time_per_output_token.observe((timings.finished_at - timings.first_token_at) / (len(sequence.output_ids) - 1))


class _SpeculationCollector:
    def __init__(self, counts: Callable[[], tuple[int, int]]):
        self._counts = counts

    def collect(self):
        drafted, accepted = self._counts()
        yield CounterMetricFamily("rz_spec_decode_num_draft_tokens", "Tokens drafted by speculative decoding", value=drafted)
        yield CounterMetricFamily(
            "rz_spec_decode_num_accepted_tokens", "Drafted tokens the model's sampler kept", value=accepted
        )


class _CompilationCollector:
    def __init__(self, compilations: dict[str, float]):
        self._compilations = compilations

    def collect(self):
        record = dict(self._compilations)
        yield CounterMetricFamily("rz_compilations", "Compiled steps (one per step and shape bucket)", value=len(record))
        yield CounterMetricFamily(
            "rz_compilation_seconds", "Seconds spent in the first call of each compiled step", value=sum(record.values())
        )
