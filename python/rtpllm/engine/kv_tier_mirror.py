"""KV tiers with tensor parallelism: every rank keeps its own KV heads in tiers of its own.

Each rank's pool holds only its KV heads, so each rank copies its own share of a block, over its
own device's link to host memory, into its own host tier (and its own disk directory). Rank 0's
scheduler decides alone: its connector is a `_C.MirroredKVConnector` over rank 0's tiers, which
records every load and save; the executor ships them to the workers ahead of the next step
(`WorkerKVOps`), each worker repeats them on its tiers (`WorkerKVTiers` below) and answers when
each ends (`WorkerKVDone`); a transfer ends for the scheduler once every rank's part has.

The ranks' tiers stay alike because they see the same operations in the same order and have the
same capacity in blocks: `resolve_host_cache` fixes the host tier's size before the workers start
(its default depends on the memory free at the moment), and `rank_cache_config` gives each rank
its share of it and a disk directory of its own (`tp<N>-rank<r>` under kv_disk_cache_dir, so a
restart with another TP size never reads shards of a different cut). Where they still differ (one
rank's disk failed), that rank's load ends FAILED and the scheduler recomputes the tokens.
The shared KV store is one store for every rank: each rank's share of a block goes under a key of
its own, salted by the first KV head the rank holds (RemoteStoreOptions.key_salt; rank 0's is the
block's hash itself), so instances of any TP size that hold the same heads share them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Optional

from rtpllm import _C
from rtpllm.config import CacheConfig, EngineConfig
from rtpllm.engine.link.messages import WorkerKVDone

logger = logging.getLogger(__name__)


def resolve_host_cache(config: EngineConfig) -> EngineConfig:
    """With tensor parallelism, the host tier's size in the config (its default measured once,
    here), so that every rank derives the same capacity from it."""
    cache = config.cache
    if config.parallel.tensor_parallel_size == 1 or cache.kv_host_cache_gib is not None:
        return config
    from rtpllm.engine.kv_tiers import host_cache_bytes

    return config.replace(cache=dataclasses.replace(cache, kv_host_cache_gib=host_cache_bytes(cache) / 2**30))


def rank_cache_config(cache: CacheConfig, rank: int, world: int) -> CacheConfig:
    """Rank `rank`'s share of the tiers: 1/world of the host and disk budgets (its blocks hold
    1/world of the heads) and a disk directory of its own."""
    if world == 1:
        return cache
    disk_dir = cache.kv_disk_cache_dir
    if disk_dir is not None:
        disk_dir = os.path.join(os.path.expanduser(disk_dir), f"tp{world}-rank{rank}")
    return dataclasses.replace(
        cache, kv_disk_cache_dir=disk_dir, kv_disk_cache_gib=cache.kv_disk_cache_gib / world,
        kv_host_cache_gib=None if cache.kv_host_cache_gib is None else cache.kv_host_cache_gib / world)


class WorkerKVTiers:
    """A worker's end: its tiers over its own pool, repeating rank 0's loads and saves in order.

    Runs on the worker's main thread only (the tiers' connector is not thread-safe)."""

    def __init__(self, tiers, rank: int, send: Callable[[object], None]):
        self.tiers = tiers  # kv_tiers.KVTiers over this rank's pool
        self.rank = rank
        self._send = send
        self._open: dict[int, int] = {}  # rank 0's handle -> this rank's handle

    @classmethod
    def build(cls, spec, runner, arch, root_hash: int, send) -> Optional["WorkerKVTiers"]:
        """This rank's tiers as the config asks, or None when there are none (then rank 0 has none
        either: it builds its own from the same config). `root_hash`: rank 0's cache identity."""
        import torch

        from rtpllm.engine.kv_tiers import build_kv_tiers
        from rtpllm.pd.head_map import rank_heads

        cache = rank_cache_config(spec.config.cache, spec.rank, spec.world_size)
        stream = torch.cuda.current_stream(spec.device).cuda_stream if spec.device.type == "cuda" else None
        first_head = rank_heads(arch.num_kv_heads, spec.rank, spec.world_size).start
        tiers = build_kv_tiers(cache, runner.kv_caches, root_hash, stream, first_head)
        return cls(tiers, spec.rank, send) if tiers is not None else None

    @property
    def pending(self) -> bool:
        return bool(self._open)

    def apply(self, operations: list) -> None:
        """Starts rank 0's operations on this rank's tiers; one that this rank refuses ends FAILED
        (its blocks are then recomputed), it never stops the worker."""
        failed = []
        connector = self.tiers.connector
        for handle, is_load, hashes, gpu_blocks in operations:
            try:
                start = connector.load if is_load else connector.save
                self._open[handle] = start(hashes, gpu_blocks)
            except (ValueError, RuntimeError) as exc:
                logger.warning("KV tiers: rank %d could not start a %s: %s", self.rank,
                               "load" if is_load else "save", exc)
                failed.append((handle, False))
        if failed:
            self._send_results(failed)

    def poll(self) -> None:
        """Answers every operation that ended since the last poll."""
        ended = []
        for handle, local in list(self._open.items()):
            state = self.tiers.connector.poll(local)
            if state != _C.TransferState.PENDING:
                del self._open[handle]
                ended.append((handle, state == _C.TransferState.DONE))
        if ended:
            self._send_results(ended)

    def close(self, timeout_s: float = 10.0) -> None:
        """Lets the transfers under way end and the disk's background writes land."""
        deadline = time.monotonic() + timeout_s
        while self._open and time.monotonic() < deadline:
            try:
                self.poll()
            except OSError:
                break  # the engine is gone: nobody waits for the answers
            time.sleep(0.0005)
        self.tiers.flush()

    def _send_results(self, results: list) -> None:
        self._send(WorkerKVDone(self.rank, results))
