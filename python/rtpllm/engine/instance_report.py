"""What an engine tells a router about itself: the block hashes it stored and evicted (KV events),
its load, and the facts a router needs to hash prompts the way this engine does.

The C++ block pool and the KV tiers below it (host, disk: kvstore/) record stored/evicted hashes,
each under its tier, into a bounded `_C.KVEventLog`; the engine's step
loop drains it after every step into a `KVEventBatch`, which rides to the server with the step's
frame (engine_core.py) and is published on `GET /kv_events` (serving/kv_events.py). After the log
overflowed (more events between two drains than it holds) the batch carries a snapshot of every
cached hash, per tier, instead, so the server's mirror is exact again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from rtpllm import _C

if TYPE_CHECKING:
    from rtpllm.engine.engine import Engine

# Events between two drains (a drain follows every step): 64k blocks of 16 tokens is a 1M-token
# step, far beyond any real one; the bound only keeps an undrained log (the offline LLM) small.
KV_EVENT_LOG_CAPACITY = 1 << 16
TIER_NAMES = {int(_C.KVTier.DEVICE): "device", int(_C.KVTier.HOST): "host", int(_C.KVTier.DISK): "disk",
              int(_C.KVTier.REMOTE): "remote"}
STORED, REMOVED = int(_C.KVEventKind.STORED), int(_C.KVEventKind.REMOVED)


@dataclass(frozen=True)
class KVEventBatch:
    """The hashes stored and removed since the previous batch, oldest first (parallel arrays)."""

    hashes: np.ndarray  # uint64 [n]
    kinds: np.ndarray  # uint8 [n]: STORED or REMOVED
    tiers: np.ndarray  # uint8 [n]: _C.KVTier values (TIER_NAMES)
    # Set after the log overflowed: every device-tier hash cached now, and every block the tiers
    # below hold (hashes, tiers). They replace the reader's view (and the arrays above are empty).
    reset: Optional[np.ndarray] = None
    reset_tier_hashes: Optional[np.ndarray] = None  # uint64 [m]
    reset_tier_ids: Optional[np.ndarray] = None  # uint8 [m]: _C.KVTier values


@dataclass(frozen=True)
class CacheIdentity:
    """How this engine keys its prefix cache: a router hashes prompts the same way to predict hits.
    Block i's key is `_C.hash_block_tokens(key of block i-1, tokens of block i, extra_key)`, block
    0's parent being `root_block_hash`."""

    block_size: int
    root_block_hash: int
    extra_key: int = 0  # the key ordinary requests use (prompt-logprob requests opt out with others)


@dataclass(frozen=True)
class InstanceLoad:
    num_running: int
    num_waiting: int
    tokens_in_flight: int  # prompt + generated tokens of unfinished requests
    kv_usage: float  # fraction of KV blocks held by requests
    step_time_s: float  # recent step duration (exponential average)
    prefix_cache_queries: int
    prefix_cache_hits: int


class StepTimer:
    """Exponential average of step durations; weight 0.2 follows a load change within ~10 steps."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.value = 0.0

    def observe(self, duration_s: float) -> None:
        self.value = duration_s if self.value == 0.0 else self.value + self.weight * (duration_s - self.value)


class InstanceReporter:
    """Owns the engine's KV event log and step timer."""

    def __init__(self, scheduler, block_size: int, root_block_hash: int, log_capacity: int = KV_EVENT_LOG_CAPACITY):
        self._scheduler = scheduler
        self._log = _C.KVEventLog(log_capacity)
        scheduler.set_kv_event_log(self._log)
        self.step_timer = StepTimer()
        # The chain's root is the engine's cache identity (model, dtype, layout): the router hashes
        # prompts from it, so its hashes are the ones this instance stores.
        self.identity = CacheIdentity(block_size=block_size, root_block_hash=int(root_block_hash))

    def drain_kv_events(self) -> Optional[KVEventBatch]:
        """The events since the last call, or None when there were none."""
        overflowed, hashes, kinds, tiers = self._log.drain()
        if overflowed:
            tier_hashes, tier_ids = self._scheduler.tier_held_blocks()
            return KVEventBatch(hashes, kinds, tiers, reset=self._scheduler.cached_block_hashes(),
                                reset_tier_hashes=tier_hashes, reset_tier_ids=tier_ids)
        if len(hashes) == 0:
            return None
        return KVEventBatch(hashes, kinds, tiers)


def instance_load(engine: "Engine") -> InstanceLoad:
    """The engine's load now (run where the engine runs: `call_in_engine_thread(instance_load)`)."""
    stats = engine.stats()
    return InstanceLoad(num_running=stats.num_running, num_waiting=stats.num_waiting,
                        tokens_in_flight=engine.tokens_in_flight(), kv_usage=stats.kv_usage,
                        step_time_s=engine.reporter.step_timer.value,
                        prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits)


def cache_identity(engine: "Engine") -> tuple[CacheIdentity, str]:
    """The engine's cache identity and model path (`call_in_engine_thread(cache_identity)`)."""
    return engine.reporter.identity, engine.model_path
