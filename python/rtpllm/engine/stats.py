"""A snapshot of the engine's counters, read by metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rtpllm.spec.stats import SpecCounters


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

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
