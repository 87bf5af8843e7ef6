"""Prometheus metrics of the server, named like vLLM's (`rtpllm:` for `vllm:`) so dashboards port.

Two sources:
- engine counters (running/waiting requests, KV blocks, prefix cache, token totals) are read from
  the AsyncEngine's latest `EngineStats` at scrape time by a custom collector, so they cost nothing
  per step;
- per-request latencies (TTFT, inter-token, end-to-end, queue time) and finish reasons are
  observed as outputs arrive, through `AsyncEngine`'s step observer.

Each server gets its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from rtpllm.engine.stats import LOAD_LATENCY_BUCKETS
from rtpllm.outputs import RequestOutput

if TYPE_CHECKING:
    from rtpllm.engine.async_engine import AsyncEngine

PREFIX = "rtpllm:"
# Buckets in seconds, from sub-millisecond CPU steps to multi-minute generations.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0)


class _EngineStatsCollector(Collector):
    def __init__(self, engine: "AsyncEngine", model_name: str):
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        labels = ["model_name"]
        values = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("kv_cache_blocks_used", "KV cache blocks held by requests.", stats.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV cache blocks in the pool.", stats.kv_blocks_total)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", stats.kv_usage)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted to free KV blocks.", stats.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        if stats.spec is not None:  # speculative decoding, labelled by proposer (vLLM's metric names)
            spec_labels = labels + ["method"]
            for name, doc, value in (
                    ("spec_decode_num_drafts", "Sequence-steps that verified drafts.", stats.spec.num_verified_seqs),
                    ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                     stats.spec.num_draft_tokens),
                    ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.spec.num_accepted_tokens)):
                family = CounterMetricFamily(PREFIX + name, doc, labels=spec_labels)
                family.add_metric(values + [stats.spec.method], value)
                yield family
            family = GaugeMetricFamily(PREFIX + "spec_decode_mean_accepted_length",
                                       "Tokens per verified sequence-step (accepted drafts + 1).", labels=spec_labels)
            family.add_metric(values + [stats.spec.method], stats.spec.mean_accepted_length)
            yield family
        yield gauge("num_requests_waiting_for_kv", "Requests whose prefix is loading from a KV tier.",
                    stats.num_waiting_for_kv)
        yield counter("kv_tier_hit_tokens", "Prompt tokens loaded from a KV tier instead of computed.",
                      stats.kv_tier_hit_tokens)
        yield counter("kv_tier_recomputes", "KV tier loads that failed or timed out; their tokens were recomputed.",
                      stats.kv_tier_failed_loads)
        if stats.kv_tiers:
            yield from _tier_metrics(self._model_name, stats.kv_tiers)
        if stats.pd:  # prefill-decode disaggregation: how each PD request ended on this instance
            family = CounterMetricFamily(PREFIX + "pd_requests", "PD requests by role and outcome (completed, "
                                         "timed_out, peer_failed, failed, aborted).",
                                         labels=["model_name", "role", "outcome"])
            for role, outcome, count in stats.pd:
                family.add_metric([self._model_name, role, outcome], count)
            yield family


def _tier_metrics(model_name: str, tiers) -> Iterator[Metric]:
    """Per tier below the KV pool (label `tier`: host, disk, ...)."""
    labels = ["model_name", "tier"]

    def family(kind, name: str, doc: str, value_of) -> Metric:
        metric = kind(PREFIX + name, doc, labels=labels)
        for t in tiers:
            metric.add_metric([model_name, t.name], value_of(t))
        return metric

    yield family(CounterMetricFamily, "kv_tier_queries", "Prefix lookups in the tier.", lambda t: t.queries)
    yield family(CounterMetricFamily, "kv_tier_query_blocks", "Blocks looked up in the tier.",
                 lambda t: t.query_blocks)
    yield family(CounterMetricFamily, "kv_tier_hit_blocks", "Blocks the tier held when looked up.",
                 lambda t: t.hit_blocks)
    yield family(CounterMetricFamily, "kv_tier_loaded_blocks", "Blocks copied from the tier into the KV pool.",
                 lambda t: t.loaded_blocks)
    yield family(CounterMetricFamily, "kv_tier_saved_blocks", "Blocks copied into the tier.", lambda t: t.saved_blocks)
    yield family(CounterMetricFamily, "kv_tier_load_bytes", "Bytes moved from the tier to the KV pool.",
                 lambda t: t.load_bytes)
    yield family(CounterMetricFamily, "kv_tier_save_bytes", "Bytes moved into the tier.", lambda t: t.save_bytes)
    yield family(CounterMetricFamily, "kv_tier_failed_loads", "Loads from the tier that failed.",
                 lambda t: t.failed_loads)
    yield family(CounterMetricFamily, "kv_tier_skipped_blocks", "Blocks the tier held but left to recompute, "
                 "since loading them was expected to take longer.", lambda t: t.skipped_blocks)
    yield family(CounterMetricFamily, "kv_tier_evicted_blocks", "Blocks dropped from the tier for room.",
                 lambda t: t.evicted_blocks)
    yield family(GaugeMetricFamily, "kv_tier_capacity_bytes", "The tier's capacity.",
                 lambda t: t.capacity_blocks * t.bytes_per_block)
    yield family(GaugeMetricFamily, "kv_tier_used_bytes", "Bytes of KV the tier holds.",
                 lambda t: t.used_blocks * t.bytes_per_block)
    yield family(GaugeMetricFamily, "kv_tier_usage_perc", "Fraction of the tier's capacity in use (0 to 1).",
                 lambda t: t.used_blocks / t.capacity_blocks if t.capacity_blocks else 0.0)
    yield family(GaugeMetricFamily, "kv_tier_enabled", "1 while the tier accepts writes, 0 once it stopped "
                 "itself (a full disk, an I/O error).", lambda t: 1.0 if t.enabled else 0.0)
    latency = HistogramMetricFamily(PREFIX + "kv_tier_load_latency_seconds", "Time from a load's start to its end.",
                                    labels=labels)
    bounds = [str(b) for b in LOAD_LATENCY_BUCKETS] + ["+Inf"]
    for t in tiers:
        latency.add_metric([model_name, t.name], list(zip(bounds, t.load_latency_buckets)), t.load_latency_sum)
    yield latency


class ServerMetrics:
    """The server's metrics registry; also the AsyncEngine's step observer."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                              registry=self.registry, buckets=_TTFT_BUCKETS).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.", labels,
                             registry=self.registry, buckets=_ITL_BUCKETS).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             registry=self.registry, buckets=_REQUEST_BUCKETS).labels(model_name)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time waiting before first scheduled.",
                                    labels, registry=self.registry, buckets=_REQUEST_BUCKETS).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._success_by_reason = {}

    def attach(self, engine: "AsyncEngine") -> None:
        """Exposes the engine's counters and observes its steps."""
        self.registry.register(_EngineStatsCollector(engine, self.model_name))
        engine.observer = self

    def on_step(self, time_to_first_tokens: list[float], inter_token_latencies: list[float],
                finished: list[RequestOutput]) -> None:
        for latency in time_to_first_tokens:
            self.ttft.observe(latency)
        for latency in inter_token_latencies:
            self.itl.observe(latency)
        for output in finished:
            self._on_finished(output)

    def _on_finished(self, output: RequestOutput) -> None:
        metrics = output.metrics
        if metrics is not None:
            if metrics.first_scheduled_time is not None:
                self.queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
            if metrics.finished_time is not None:
                self.e2e.observe(metrics.finished_time - metrics.arrival_time)
        for completion in output.outputs:
            reason = completion.finish_reason or "unknown"
            counter = self._success_by_reason.get(reason)
            if counter is None:
                counter = self._success_by_reason[reason] = self._success.labels(self.model_name, reason)
            counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
