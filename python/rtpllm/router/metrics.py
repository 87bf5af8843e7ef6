"""The router's Prometheus metrics (`rtpllm_router:`): what it routed where, with what expected
cache hit, how its instances are doing, and (prefill-decode mode) how each request's hand-off went."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rtpllm.router.backend import BackendPool

PREFIX = "rtpllm_router:"


class _BackendCollector(Collector):
    def __init__(self, pools: tuple[BackendPool, ...]):
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "backend_healthy": ("1 while the instance is in the pool.", lambda b: float(b.healthy)),
            "backend_in_flight": ("Requests the router has in flight there.", lambda b: b.in_flight),
            "backend_pending_prefill_tokens": ("Prompt tokens sent there, not expected cached, that await their first token.",
                                               lambda b: b.pending_prefill_tokens),
            "backend_cached_blocks": ("Device-tier blocks the router believes the instance caches.",
                                      lambda b: len(b.view.held.get("device", ()))),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["backend"])
            for b in (b for pool in self._pools for b in pool.backends):
                family.add_metric([b.url], value(b))
            yield family


class RouterMetrics:
    def __init__(self, *pools: BackendPool):
        self.registry = CollectorRegistry()
        self.routed = Counter(PREFIX + "requests", "Requests sent to an instance (retries count again).",
                              ["backend", "lane"], registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens routed.", ["backend"],
                                     registry=self.registry)
        self.expected_hit_tokens = Counter(PREFIX + "expected_hit_tokens",
                                           "Prompt tokens expected to be cached where they were routed.",
                                           ["backend"], registry=self.registry)
        self.retries = Counter(PREFIX + "retries", "Requests tried again on another instance.", ["reason"],
                               registry=self.registry)
        self.failures = Counter(PREFIX + "failures", "Requests the router answered with an error itself.",
                                ["reason"], registry=self.registry)
        # Prefill-decode mode (pd_proxy.py).
        self.pd_requests = Counter(PREFIX + "pd_requests", "Prefill-decode requests by how they ended: ok, "
                                   "client_disconnected, prefill_failed, decode_error, decode_failed, stream_broken, "
                                   "no_decode_instance, bad_request, internal_error.", ["outcome"],
                                   registry=self.registry)
        self.pd_prefill_failures = Counter(PREFIX + "pd_prefill_failures", "Prefill attempts that failed, by reason "
                                           "(retried ones included).", ["reason"], registry=self.registry)
        self.pd_decode_failures = Counter(PREFIX + "pd_decode_failures", "Decode attempts that failed, by reason "
                                          "(retried ones included).", ["reason"], registry=self.registry)
        self.pd_reserve_seconds = Histogram(PREFIX + "pd_reserve_seconds", "From the decode request to its "
                                            "reservation.", registry=self.registry)
        self.pd_prefill_seconds = Histogram(PREFIX + "pd_prefill_seconds", "From the prefill request to its answer "
                                            "(KV written to the decode instance).", registry=self.registry)
        self.pd_transferred_bytes = Counter(PREFIX + "pd_transferred_bytes", "KV bytes the prefill instances "
                                            "reported writing.", registry=self.registry)
        self.registry.register(_BackendCollector(pools))

    def render(self) -> bytes:
        return generate_latest(self.registry)
