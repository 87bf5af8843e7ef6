"""Which instance serves a request: lanes narrow the candidates, the policy picks among them.

Policies (`RouterConfig.policy`):
- round_robin: the next candidate in turn.
- least_loaded: fewest requests in flight from this router, then fewest prompt tokens to prefill.
- cache_aware: least work ahead of the request, counted in prompt tokens:
      cache_weight * (its prompt tokens not cached there)
    + load_weight * (prompt tokens queued there for prefill, their expected hits excluded
                     + decode_weight * (requests decoding there + requests other clients put there))
  "Cached there" comes from the instance's KV events (kv_view.py): the prompt is hashed block by
  block with the instance's own chain, and the leading blocks it holds count as hits (blocks in its
  host or disk tier count `host_hit_weight` / `disk_hit_weight` of a device hit).
  The queue is the router's own bookkeeping (tickets: exact and immediate); only other clients'
  requests come from the polled load reports. Work already counts in the cost's units, so the cost
  itself bounds how far stickiness piles onto one instance: a holder wins only while its queue is
  shorter than the prefill the hit saves. (A separate bounded-load cap, "best hit among instances
  within a factor of the least loaded", only lost hits and raised TTFT in the routing simulator,
  tools/router_sim.py.)

Lanes (`long_prompt_threshold`): a long prompt goes to the long-lane instances when some are
configured (short prompts then stay off them while another instance is up). Otherwise an instance
takes at most `max_long_per_instance` long prefills at once, and long prefills never occupy every
instance: a long prompt that finds no slot waits in the router until one frees up, so short
requests always have an instance without a long prefill in front of them.

Prefill-decode pools (pd_proxy.py): the policy and lanes pick the prefill instance, where the
prompt is computed and cached; the decode instance is `least_loaded_decode`'s pick.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

from rtpllm.router.backend import Backend, BackendPool, Ticket
from rtpllm.router.config import RouterConfig
from rtpllm.router.kv_view import prefix_block_hashes


@dataclass
class RoutingInput:
    token_ids: Optional[list[int]]  # the (first) prompt's tokens; None when the router could not tokenize
    num_prompt_tokens: int


@dataclass
class Choice:
    backend: Backend
    hit_tokens: int  # prompt tokens expected to be cached there
    hashes: list[int]  # the prompt's block hashes on that instance's chain (to predict its cache)


class LaneGate:
    def __init__(self, config: RouterConfig):
        self.config = config

    def is_long(self, request: RoutingInput) -> bool:
        threshold = self.config.long_prompt_threshold
        return threshold is not None and request.num_prompt_tokens > threshold

    def candidates(self, healthy: Sequence[Backend], long: bool) -> list[Backend]:
        """The instances this request may go to now; empty: a long prompt must wait for a slot."""
        if self.config.long_lane:
            lane = [b for b in healthy if b.long_lane == long]
            return lane or list(healthy)  # a lane with nobody up borrows the other lane
        if not long or len(healthy) <= 1:
            if long:
                return [b for b in healthy if b.long_prefills < self.config.max_long_per_instance]
            return list(healthy)
        occupied = sum(1 for b in healthy if b.long_prefills > 0)
        return [b for b in healthy
                if b.long_prefills < self.config.max_long_per_instance
                and (b.long_prefills > 0 or occupied + 1 < len(healthy))]


class RoutingPolicy:
    def __init__(self, config: RouterConfig, pool: BackendPool):
        self.config = config
        self.pool = pool
        self.lanes = LaneGate(config)
        self._turn = itertools.count()

    async def route(self, request: RoutingInput, exclude: Sequence[Backend] = ()) -> Optional[Choice]:
        """The instance for `request`, skipping `exclude` (instances already tried); waits while
        a long prompt has no slot. None when no instance is up."""
        long = self.lanes.is_long(request)
        while True:
            healthy = [b for b in self.pool.healthy() if b not in exclude]
            if not healthy:
                return None
            candidates = self.lanes.candidates(healthy, long)
            if candidates:
                return self.choose(request, candidates)
            await self._wait_for_slot(healthy)

    def choose(self, request: RoutingInput, candidates: Sequence[Backend]) -> Choice:
        hashes_by_identity: dict = {}

        def hashes_for(backend: Backend) -> list[int]:
            identity = backend.view.identity
            if request.token_ids is None or identity is None:
                return []
            if identity not in hashes_by_identity:
                hashes_by_identity[identity] = prefix_block_hashes(request.token_ids, *identity)
            return hashes_by_identity[identity]

        policy = self.config.policy
        if policy == "round_robin":
            backend = candidates[next(self._turn) % len(candidates)]
        elif policy == "least_loaded":
            backend = min(candidates, key=lambda b: (b.in_flight, b.pending_prefill_tokens, b.routed_total))
        else:
            return min((self._cache_aware(request, b, hashes_for(b)) for b in candidates),
                       key=lambda scored: scored[0])[1]
        hashes = hashes_for(backend)
        return Choice(backend, self._hit_tokens(backend, hashes), hashes)

    def dispatch(self, choice: Choice, request: RoutingInput) -> Ticket:
        """Books `request` on the chosen instance: the router's own load accounting (released by
        the ticket) and the cache it predicts there."""
        backend = choice.backend
        ticket = backend.admit(request.num_prompt_tokens, self.lanes.is_long(request), choice.hit_tokens)
        backend.view.predict(choice.hashes, self.config.predicted_ttl_s)
        return ticket

    def _hit_tokens(self, backend: Backend, hashes: list[int]) -> int:
        """Prompt tokens the instance is expected not to compute: a device hit counts whole, a block
        it would copy up from its host or disk tier counts `host_hit_weight`/`disk_hit_weight` of
        one (the copy's cost against the compute it saves)."""
        if not hashes:
            return 0
        weights = {"device": 1.0, "host": self.config.host_hit_weight, "disk": self.config.disk_hit_weight,
                   "remote": self.config.disk_hit_weight}
        blocks = sum(weights[tier] * n for tier, n in backend.view.matched_by_tier(hashes).items())
        return int(blocks * (backend.view.block_size or 0))

    def _cache_aware(self, request: RoutingInput, backend: Backend, hashes: list[int]) -> tuple[tuple, Choice]:
        c = self.config
        hit = self._hit_tokens(backend, hashes)
        queue = backend.pending_prefill_tokens + c.decode_weight * (backend.decoding + backend.foreign_requests)
        cost = c.cache_weight * (request.num_prompt_tokens - hit) + c.load_weight * queue
        # Ties (an idle pool, no hits anywhere): the instance that got the fewest requests so far.
        return (cost, backend.in_flight, backend.routed_total), Choice(backend, hit, hashes)

    async def _wait_for_slot(self, healthy: Sequence[Backend]) -> None:
        waits = [asyncio.ensure_future(b.released.wait()) for b in healthy]
        waits.append(asyncio.ensure_future(self.pool.changed.wait()))
        try:
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        for b in healthy:
            b.released.clear()


# KV usage within one band counts as equal, so the router's own in-flight count (exact and instant)
# decides among them rather than a usage polled a moment ago.
_KV_USAGE_BANDS = 10


def least_loaded_decode(candidates: Sequence[Backend]) -> Optional[Backend]:
    """The decode instance for a new request: decode is memory-bound and a reservation holds KV
    blocks for the whole prompt, so its KV usage (from `GET /load`, in bands of 10%) matters most;
    then the requests this router has in flight there, then the exact usage, then turns."""
    if not candidates:
        return None

    def key(b: Backend) -> tuple:
        usage = float(b.load.get("kv_usage", 0.0) or 0.0)
        return min(int(usage * _KV_USAGE_BANDS), _KV_USAGE_BANDS - 1), b.in_flight, usage, b.routed_total

    return min(candidates, key=key)
