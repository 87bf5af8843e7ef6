"""A KVConnector written in Python over the engine's KV tensors, for engine-level tests of the
scheduler's tier path that need faults the real tiers cannot be asked for (failed loads, hangs).

Copies happen when a transfer completes (on the poll that reports its end), as with a real
asynchronous copy engine: a block the scheduler reused or evicted while a transfer still named it
would come back with the wrong contents, and the engine's tokens would change.
"""

from __future__ import annotations

import torch

from rtpllm import _C
from rtpllm.engine.kv_tiers import KVTiers


class DictKVConnector(_C.KVConnector):
    def __init__(self, kv_caches: list[torch.Tensor]):
        super().__init__()
        self.kv_caches = kv_caches
        self.store: dict[int, torch.Tensor] = {}  # hash -> [layers, 2, block_size, heads, dim]
        self.open: dict[int, list] = {}
        self.next_handle = 1
        self.latency_polls = 0
        self.fail_loads = False
        self.hang_loads = False  # loads submitted while set stay PENDING until release_hung_loads()
        self.counters = dict(queries=0, hit_blocks=0, loaded_blocks=0, saved_blocks=0, failed_loads=0)

    def name(self) -> str:
        return "pyfake"

    def match(self, hashes) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.store:
            n += 1
        self.counters["queries"] += 1
        self.counters["hit_blocks"] += n
        return n

    def load(self, hashes, gpu_blocks) -> int:
        return self._submit("load", hashes, gpu_blocks)

    def save(self, hashes, gpu_blocks) -> int:
        return self._submit("save", hashes, gpu_blocks)

    def poll(self, handle) -> "_C.TransferState":
        if handle not in self.open:
            raise ValueError(f"unknown handle {handle}")
        transfer = self.open[handle]
        kind, hashes, blocks, polls_left, hung = transfer
        if hung:
            return _C.TransferState.PENDING
        if polls_left > 0:
            transfer[3] -= 1
            return _C.TransferState.PENDING
        del self.open[handle]
        if kind == "save":
            for h, b in zip(hashes, blocks):
                self.store.setdefault(h, torch.stack([t[:, b].clone() for t in self.kv_caches]))
            self.counters["saved_blocks"] += len(hashes)
            return _C.TransferState.DONE
        if self.fail_loads or any(h not in self.store for h in hashes):
            self.counters["failed_loads"] += 1
            return _C.TransferState.FAILED
        for h, b in zip(hashes, blocks):
            for layer, t in enumerate(self.kv_caches):
                t[:, b] = self.store[h][layer]
        self.counters["loaded_blocks"] += len(hashes)
        return _C.TransferState.DONE

    def stats(self):
        s = _C.KVTierStats()
        s.name = "pyfake"
        for key, value in self.counters.items():
            setattr(s, key, value)
        s.used_blocks = s.capacity_blocks = len(self.store)
        return [s]

    def _submit(self, kind, hashes, blocks) -> int:
        assert len(hashes) == len(blocks)
        handle = self.next_handle
        self.next_handle += 1
        self.open[handle] = [kind, list(hashes), list(blocks), self.latency_polls, kind == "load" and self.hang_loads]
        return handle

    def release_hung_loads(self) -> None:
        self.hang_loads = False
        for transfer in self.open.values():
            transfer[4] = False


def attach_fake_tier(engine, load_timeout_s: float = 5.0) -> DictKVConnector:
    """Gives an engine built without tiers (kv_host_cache_gib=0) a DictKVConnector instead."""
    assert engine.kv_tiers is None, "build the engine with kv_host_cache_gib=0"
    fake = DictKVConnector(engine.runner.kv_caches)
    engine.kv_tiers = KVTiers(fake, {}, engine.runner.kv_caches, 0)
    engine.scheduler.set_kv_connector(fake, load_timeout_s, memory_owner=engine.kv_tiers)
    return fake
