"""A snapshot of the engine's counters, read by metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rtpllm.spec.stats import SpecCounters

# Upper bounds (seconds) of the KV tiers' load latency histogram, from a host copy to a slow disk.
LOAD_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class KVTierSnapshot:
    """One tier's counters as of a step (cumulative unless noted); travels in EngineStats."""

    name: str
    queries: int
    query_blocks: int
    hit_blocks: int
    loaded_blocks: int
    saved_blocks: int
    load_bytes: int
    save_bytes: int
    failed_loads: int
    evicted_blocks: int
    capacity_blocks: int  # current
    used_blocks: int  # current
    enabled: bool  # False once the tier stopped itself (a full disk, an I/O error)
    bytes_per_block: int
    load_latency_buckets: tuple[int, ...]  # cumulative count per LOAD_LATENCY_BUCKETS bound, then +Inf
    load_latency_sum: float
    load_latency_count: int
    skipped_blocks: int = 0  # held, but left to recompute: loading them was expected to be slower


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found cached
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec: Optional[SpecCounters] = None  # speculative decoding counters, when it is on
    # The tiers below the KV pool (host memory, disk): zero and () when there are none.
    num_waiting_for_kv: int = 0  # requests whose prefix is loading from a tier
    kv_tier_hit_tokens: int = 0  # prompt tokens loaded from a tier instead of computed
    kv_tier_failed_loads: int = 0  # loads that failed or timed out: recomputed
    kv_tiers: tuple[KVTierSnapshot, ...] = ()
    # Prefill-decode disaggregation: (role, outcome, count) per outcome so far; () for role both.
    pd: tuple[tuple[str, str, int], ...] = ()

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
