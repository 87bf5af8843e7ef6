"""The router's picture of one instance's prefix cache, built from its KV events.

`KVView.apply(reply)` takes one `GET /kv_events` reply: events are applied in order; a resync reply
(first subscription, an instance restart, or a subscriber that fell behind the instance's ring:
"overflow: resync") replaces the whole view with the snapshot. Hashes of prompts the router just
sent to the instance count as held for a while ("predicted") until its events report them. Events name a tier (device, host, disk, remote): a
prompt prefix held below the device still saves its prefill, at the price of a copy up.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from rtpllm import _C

DEVICE = "device"
LOWER_TIERS = ("host", "disk", "remote")  # fastest first, as the engine's tiered connector asks them


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, root_hash: int, extra_key: int = 0) -> list[int]:
    """The keys an instance gives the prompt's full blocks, as its prefix-cache lookup computes
    them (never the block holding the last token: that one is always recomputed)."""
    hashes = []
    parent = root_hash
    for start in range(0, ((len(token_ids) - 1) // block_size) * block_size, block_size):
        parent = _C.hash_block_tokens(parent, token_ids[start:start + block_size], extra_key)
        hashes.append(parent)
    return hashes


class KVView:
    def __init__(self) -> None:
        self.instance_id: Optional[str] = None
        self.cursor: Optional[int] = None
        self.block_size: Optional[int] = None
        self.root_hash = 0
        self.extra_key = 0
        self.held: dict[str, set[int]] = {}
        self._predicted: dict[int, float] = {}  # hash -> expiry (monotonic seconds)
        self.num_resyncs = 0
        self.clock = time.monotonic  # the routing simulator (tools/router_sim.py) runs it on its own time

    @property
    def identity(self) -> Optional[tuple[int, int, int]]:
        """(block_size, root hash, extra key): prompts are hashed per identity; None before the
        first reply."""
        return None if self.block_size is None else (self.block_size, self.root_hash, self.extra_key)

    def drop(self) -> None:
        """Forgets everything (the instance left the pool); the next poll resubscribes."""
        self.instance_id = self.cursor = None
        self.held = {}
        self._predicted.clear()

    def apply(self, reply: dict) -> None:
        self.block_size = int(reply["block_size"])
        self.root_hash = int(reply["root_block_hash"])
        self.extra_key = int(reply.get("extra_key", 0))
        if "resync" in reply:
            self.held = {tier: set(hashes) for tier, hashes in reply.get("snapshot", {}).items()}
            self.num_resyncs += 1
        else:
            events = reply["events"]
            for kind, tier, h in zip(events["kinds"], events["tiers"], events["hashes"]):
                tier_set = self.held.setdefault(tier, set())
                if kind == "stored":
                    tier_set.add(h)
                    self._predicted.pop(h, None)
                else:
                    tier_set.discard(h)
        self.instance_id = reply["instance_id"]
        self.cursor = int(reply["cursor"])

    def predict(self, hashes: Sequence[int], ttl_s: float) -> None:
        expiry = self.clock() + ttl_s
        device = self.held.get(DEVICE, ())
        for h in hashes:
            if h not in device:
                self._predicted[h] = expiry
        if len(self._predicted) > 4 * (len(device) + 1024):
            self._expire()

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` this instance holds on the device (or predicted there)."""
        device = self.held.get(DEVICE, ())
        now = self.clock()
        n = 0
        for h in hashes:
            if h in device:
                n += 1
                continue
            expiry = self._predicted.get(h)
            if expiry is None or expiry < now:
                break
            n += 1
        return n

    def matched_by_tier(self, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks of the longest prefix of `hashes` this instance can supply, by where each comes
        from: the device prefix first (matched_blocks), then the blocks after it that a lower tier
        holds, as the engine loads them (each from the fastest tier that has it)."""
        n = self.matched_blocks(hashes)
        counts = {DEVICE: n}
        lower = [(tier, self.held[tier]) for tier in LOWER_TIERS if self.held.get(tier)]
        for h in hashes[n:]:
            tier = next((name for name, held in lower if h in held), None)
            if tier is None:
                break
            counts[tier] = counts.get(tier, 0) + 1
        return counts

    def _expire(self) -> None:
        now = self.clock()
        self._predicted = {h: t for h, t in self._predicted.items() if t >= now}
