"""The tiers below the KV pool (host memory, local disk) for one engine: built from CacheConfig,
handed to the scheduler as one KVConnector, and read back as per-tier counters for /metrics.

Ownership: Python allocates the pool (kv_cache.py) and stays its only owner. C++ gets addresses
only (`kv_layout`): the copy engine reads and writes blocks there on its own thread (CPU) or
stream (CUDA). So the pool must outlive every C++ object that holds the layout: `KVTiers` keeps
the tensors referenced, `Scheduler.set_kv_connector` keeps the connector and the tensors alive as
long as the scheduler, and `Engine.close()` drains the transfers before anything is let go.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the server imports kv_layout's module (pd/engine_side.py) and needs no torch
    import torch

from rtpllm import _C
from rtpllm.config import CacheConfig
from rtpllm.engine.kv_store_client import remote_store_tier
from rtpllm.engine.stats import LOAD_LATENCY_BUCKETS, KVTierSnapshot

logger = logging.getLogger(__name__)

_DEFAULT_HOST_CAP_BYTES = 4 << 30
_DEFAULT_HOST_FRACTION = 8  # of the memory available at start


def host_cache_bytes(cache: CacheConfig) -> int:
    """The host tier's size: `kv_host_cache_gib`, or by default min(4 GiB, 1/8 of the memory
    available now), so that a small machine is never pushed into swap."""
    if cache.kv_host_cache_gib is not None:
        return int(cache.kv_host_cache_gib * 2**30)
    return min(_DEFAULT_HOST_CAP_BYTES, _available_memory_bytes() // _DEFAULT_HOST_FRACTION)


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_layout(kv_caches: list[torch.Tensor], block_size: int) -> "_C.KVLayout":
    """Where each layer's K and V planes live (kv_cache.py's `[2, num_blocks, block_size,
    num_kv_heads, head_dim]` tensors), for C++ to address block b of layer l."""
    first = kv_caches[0]
    _, num_blocks, _, num_kv_heads, head_dim = first.shape
    for t in kv_caches:
        if not t.is_contiguous() or t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError("kv_caches: every layer must be one contiguous tensor of the same shape, dtype and device")
    layout = _C.KVLayout(
        memory=_C.MemoryKind.CUDA if first.device.type == "cuda" else _C.MemoryKind.HOST,
        device_index=first.device.index or 0, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
        head_dim=head_dim, element_bytes=first.element_size(),
        block_stride_bytes=first.stride(1) * first.element_size(),
        layers=[_C.KVLayerAddress(t[0].data_ptr(), t[1].data_ptr()) for t in kv_caches])
    layout.validate()
    return layout


class KVTiers:
    """The connector the scheduler uses, the tiers behind it, and their counters."""

    def __init__(self, connector: "_C.KVConnector", tiers: dict, kv_caches: list[torch.Tensor],
                 bytes_per_block: int):
        # NOTE: the C++ objects first and the tensors last: attributes are released in this order.
        self.connector = connector
        self.tiers = tiers  # name -> tier ("host", "disk", "remote"), fastest first; the connector shares them
        self.bytes_per_block = bytes_per_block  # of this rank's pool
        # Tensor parallelism: this many ranks hold an equal share of every block (their tiers
        # mirror this one's), so the counters in bytes count the whole model's.
        self.num_shards = 1
        self._latency: dict[str, tuple[list[int], float, int]] = {}
        self._kv_caches = kv_caches

    def snapshot(self) -> tuple[KVTierSnapshot, ...]:
        """Every tier's counters; folds the load latencies reported since the last call into
        cumulative histograms (so call it regularly: the engine does, once per stats())."""
        return tuple(self._snapshot(s) for s in self.connector.stats())

    def _snapshot(self, s) -> KVTierSnapshot:
        counts, total, n = self._latency.get(s.name) or ([0] * (len(LOAD_LATENCY_BUCKETS) + 1), 0.0, 0)
        for latency in s.load_latency_s:
            for i, bound in enumerate(LOAD_LATENCY_BUCKETS):
                if latency <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            total += latency
            n += 1
        self._latency[s.name] = (counts, total, n)
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return KVTierSnapshot(
            name=s.name, queries=s.queries, query_blocks=s.query_blocks, hit_blocks=s.hit_blocks,
            loaded_blocks=s.loaded_blocks, saved_blocks=s.saved_blocks, load_bytes=s.load_bytes * self.num_shards,
            save_bytes=s.save_bytes * self.num_shards, failed_loads=s.failed_loads, evicted_blocks=s.evicted_blocks,
            capacity_blocks=s.capacity_blocks, used_blocks=s.used_blocks, enabled=s.enabled,
            bytes_per_block=self.bytes_per_block * self.num_shards, load_latency_buckets=tuple(cumulative),
            load_latency_sum=total, load_latency_count=n, skipped_blocks=s.skipped_blocks)

    def flush(self) -> None:
        """Waits until the background writes (the disk tier's) have landed."""
        for tier in self.tiers.values():
            if hasattr(tier, "flush"):
                tier.flush()

    def check_invariants(self) -> None:
        """Each tier's own bookkeeping (slots, index, LRU, files); raises on a violation."""
        for tier in self.tiers.values():
            if hasattr(tier, "check_invariants"):
                tier.check_invariants()


def build_kv_tiers(cache: CacheConfig, kv_caches: list[torch.Tensor], root_hash: int,
                   stream: Optional[int] = None, first_kv_head: int = 0) -> Optional[KVTiers]:
    """The tiers `cache` asks for over this pool, chained host -> disk -> remote store, or None when
    there are none (both off, or prefix caching off: only cached prefixes are kept). `stream` is the
    compute stream's handle on CUDA: copies out of the pool wait for the work queued on it.
    `first_kv_head`: with tensor parallelism, the first KV head this rank's pool holds (the remote
    store keys each rank's share apart)."""
    host_bytes = host_cache_bytes(cache)
    if not cache.enable_prefix_caching or (host_bytes == 0 and cache.kv_disk_cache_dir is None
                                           and cache.kv_store is None):
        return None
    layout = kv_layout(kv_caches, cache.block_size)
    bytes_per_block = layout.bytes_per_block()
    if layout.memory == _C.MemoryKind.CUDA and not hasattr(_C, "CudaKVCopyEngine"):
        if cache.kv_host_cache_gib is None and cache.kv_disk_cache_dir is None:
            # The remote store moves blocks over UCX, without the copy engine.
            if cache.kv_store is None:
                logger.warning("KV tiers off: this build has no CUDA copy engine (build with RTPLLM_CUDA=1)")
                return None
            host_bytes = 0
        elif host_bytes > 0 or cache.kv_disk_cache_dir is not None:
            raise ValueError("kv_host_cache_gib: KV tiers on CUDA need rtpllm built with RTPLLM_CUDA=1 (the CUDA "
                             "copy engine); pass kv_host_cache_gib=0 and no kv_disk_cache_dir to run without them")
    needs_copies = host_bytes > 0 or cache.kv_disk_cache_dir is not None
    engine = _copy_engine(layout, stream, cache.kv_copy_method) if needs_copies else None
    disk = None
    if cache.kv_disk_cache_dir is not None:
        options = _C.DiskTierOptions()
        options.directory = os.path.expanduser(cache.kv_disk_cache_dir)
        options.capacity_bytes = int(cache.kv_disk_cache_gib * 2**30)
        options.cache_identity = root_hash
        disk = _C.DiskTier(engine, options)
    tiers = {}
    if host_bytes >= bytes_per_block:
        tiers["host"] = _C.HostTier(engine, host_bytes, disk)  # writes every saved block through to disk
    elif host_bytes > 0:
        logger.warning("kv_host_cache_gib: %.3g GiB holds no block of %d bytes; host tier off",
                       host_bytes / 2**30, bytes_per_block)
    if disk is not None:
        tiers["disk"] = disk
    if cache.kv_store is not None:
        tiers["remote"] = remote_store_tier(cache, layout, root_hash, stream, first_kv_head)
    if not tiers:
        return None
    connector = _C.TieredKVConnector(list(tiers.values()), cache.kv_load_timeout_s)
    logger.info("KV tiers: %s (%d bytes per block)", ", ".join(
        f"{t.name} {t.capacity_blocks} blocks" for t in connector.stats()), bytes_per_block)
    return KVTiers(connector, tiers, kv_caches, bytes_per_block)


def _copy_engine(layout, stream: Optional[int], method: str = "kernel"):
    if layout.memory == _C.MemoryKind.CUDA:
        return _C.CudaKVCopyEngine(layout, stream or 0, getattr(_C.CudaCopyMethod, method.upper()))
    return _C.CpuKVCopyEngine(layout)


def attach_kv_tiers(scheduler, cache: CacheConfig, kv_caches: list[torch.Tensor], root_hash: int,
                    device: torch.device, executor=None, world_size: int = 1) -> Optional[KVTiers]:
    """Builds the tiers `cache` asks for over rank 0's pool and hands them to the scheduler; None
    when there are none. With tensor parallelism (`world_size` > 1) they hold rank 0's share, and
    `executor` has the other ranks repeat their loads and saves (kv_tier_mirror.py)."""
    import torch

    from rtpllm.engine.kv_tier_mirror import rank_cache_config

    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    tiers = build_kv_tiers(rank_cache_config(cache, 0, world_size), kv_caches, root_hash, stream)
    if tiers is not None and world_size > 1:
        tiers.connector = _C.MirroredKVConnector(tiers.connector, world_size - 1)
        tiers.num_shards = world_size
        executor.mirror_kv_tiers(tiers.connector)
    if tiers is not None:
        # The scheduler's own deadline is the safety net behind the connector's (which cancels the
        # copies at kv_load_timeout_s and reports FAILED).
        scheduler.set_kv_connector(tiers.connector, 2 * cache.kv_load_timeout_s, memory_owner=tiers)
    return tiers


def drain_kv_transfers(scheduler, timeout_s: float, pump=None) -> bool:
    """Polls the scheduler's transfers until none is under way (or the timeout); True when done.
    `pump`: the executor's pump_kv_tiers, where other ranks mirror the tiers."""
    deadline = time.monotonic() + timeout_s
    while scheduler.has_pending_kv_transfers():
        if time.monotonic() > deadline:
            return False
        if pump is not None:
            pump()
        scheduler.poll_kv_transfers()
        time.sleep(0.0005)
    return True
