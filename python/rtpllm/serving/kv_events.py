"""`GET /kv_events` and `GET /load`: what a router subscribes to (rtpllm/router/).

`KVEventHub` receives every step's `KVEventBatch` from the engine (`AsyncEngineBase.kv_event_sink`)
and keeps (a) a mirror of the block hashes this instance holds, per tier, and (b) the most recent
events in a ring, numbered by a cursor.

    GET /kv_events?cursor=C&instance_id=I&timeout=T     (long poll)
        {"instance_id", "cursor", "block_size", "root_block_hash", "extra_key",
         "events": {"kinds": [...], "tiers": [...], "hashes": [...]}}        events after C, oldest first
        {"instance_id", "cursor", ..., "resync": "overflow: resync", "snapshot": {"device": [...], ...}}
            when C is absent, from another instance (I differs: the server restarted) or older than
            the ring: the subscriber drops its view of this instance and takes the snapshot instead.
        Waits up to T seconds (default 5, at most 30) for an event when none is newer than C.
    GET /load   {"num_running", "num_waiting", "tokens_in_flight", "kv_usage", "step_time_s",
                 "num_in_flight", "prefix_cache_queries", "prefix_cache_hits", "instance_id",
                 "model", "model_path", "block_size", "root_block_hash", "extra_key"}

Kinds are "stored"/"removed", tiers "device"/"host"/"disk"/"remote"; hashes are unsigned 64-bit
integers (JSON numbers: read them with a parser that keeps integers exact, as Python's does).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.engine.async_engine import EngineDeadError
from rtpllm.engine.instance_report import REMOVED, STORED, TIER_NAMES, CacheIdentity, KVEventBatch
from rtpllm.engine.instance_report import cache_identity as _cache_identity
from rtpllm.engine.instance_report import instance_load
from rtpllm.serving.streaming import ClientDisconnected, cancel_on_disconnect

if TYPE_CHECKING:
    from rtpllm.engine.async_engine import AsyncEngineBase

KIND_NAMES = {STORED: "stored", REMOVED: "removed"}
DEFAULT_RING_SIZE = 1 << 18  # events kept for subscribers that fall behind (~10 MiB)
_DEVICE = "device"
_MAX_WAIT_S = 30.0


class KVEventHub:
    """The instance's view of its own cache, and the recent events a subscriber catches up from."""

    def __init__(self, ring_size: int = DEFAULT_RING_SIZE):
        self.instance_id = uuid.uuid4().hex
        self.cursor = 0  # events published so far; the next one gets this number
        self._ring: deque[tuple[str, str, int]] = deque(maxlen=ring_size)  # (kind, tier, hash)
        self._held: dict[str, set[int]] = {tier: set() for tier in TIER_NAMES.values()}
        self._changed = asyncio.Event()
        self.num_resets = 0

    @property
    def oldest_cursor(self) -> int:
        return self.cursor - len(self._ring)

    def held(self, tier: str = _DEVICE) -> set[int]:
        return self._held[tier]

    def publish(self, batch: KVEventBatch) -> None:
        if batch.reset is not None:
            # The engine's log overflowed: its snapshot replaces the mirror, and the ring restarts so
            # that every subscriber resyncs (the events it would have read are gone).
            self._held = {tier: set() for tier in TIER_NAMES.values()}
            self._held[_DEVICE] = set(batch.reset.tolist())
            if batch.reset_tier_hashes is not None:
                for h, t in zip(batch.reset_tier_hashes.tolist(), batch.reset_tier_ids.tolist()):
                    self._held[TIER_NAMES[t]].add(h)
            self._ring.clear()
            self.cursor += 1
            self.num_resets += 1
        for h, k, t in zip(batch.hashes.tolist(), batch.kinds.tolist(), batch.tiers.tolist()):
            kind, tier = KIND_NAMES[k], TIER_NAMES[t]
            if k == STORED:
                self._held[tier].add(h)
            else:
                self._held[tier].discard(h)
            self._ring.append((kind, tier, h))
            self.cursor += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def read(self, cursor: Optional[int], instance_id: Optional[str]) -> dict:
        """The events after `cursor`, or a snapshot when the subscriber must resync."""
        if cursor is None or instance_id != self.instance_id or not self.oldest_cursor <= cursor <= self.cursor:
            reason = "subscribe" if cursor is None else "overflow: resync"
            return {"instance_id": self.instance_id, "cursor": self.cursor, "resync": reason,
                    "snapshot": {tier: sorted(hashes) for tier, hashes in self._held.items() if hashes}}
        start = len(self._ring) - (self.cursor - cursor)
        events = [self._ring[i] for i in range(start, len(self._ring))]
        return {"instance_id": self.instance_id, "cursor": self.cursor,
                "events": {"kinds": [e[0] for e in events], "tiers": [e[1] for e in events],
                           "hashes": [e[2] for e in events]}}

    async def wait_past(self, cursor: int, timeout_s: float) -> None:
        if self.cursor > cursor:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass


def _int_param(request: Request, name: str) -> Optional[int]:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def add_kv_event_routes(app: FastAPI, engine: "AsyncEngineBase", ring_size: int = DEFAULT_RING_SIZE) -> KVEventHub:
    """Publishes the engine's KV events and load on `app` (see the module docstring)."""
    hub = KVEventHub(ring_size)
    engine.kv_event_sink = hub.publish
    app.state.kv_events = hub
    identity: dict = {}

    async def cache_facts() -> dict:
        if not identity:  # asked once: it never changes while the engine lives
            ident, model_path = await engine.call_in_engine_thread(_cache_identity)
            identity.update(asdict(ident), model_path=model_path)
        return identity

    def bad(message: str, param: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=400)

    def unavailable(exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": "service_unavailable", "param": None,
                                       "code": 503}}, status_code=503)

    @app.get("/kv_events")
    async def kv_events(request: Request) -> Response:
        try:
            cursor = _int_param(request, "cursor")
            timeout = float(request.query_params.get("timeout", 5.0))
        except ValueError as exc:
            return bad(str(exc), "cursor")
        if not 0 <= timeout <= _MAX_WAIT_S:
            return bad(f"timeout: must be in [0, {_MAX_WAIT_S:.0f}] seconds, got {timeout}", "timeout")
        instance_id = request.query_params.get("instance_id")
        if cursor == hub.cursor and instance_id == hub.instance_id:  # up to date: wait for news
            try:
                await cancel_on_disconnect(request, hub.wait_past(cursor, timeout))
            except ClientDisconnected:
                return Response(status_code=499)  # the subscriber went away (a router that stopped)
        try:
            facts = await cache_facts()
        except EngineDeadError as exc:
            return unavailable(exc)
        body = hub.read(cursor, instance_id)
        body.update(block_size=facts["block_size"], root_block_hash=facts["root_block_hash"],
                    extra_key=facts["extra_key"])
        return JSONResponse(body)

    @app.get("/load")
    async def load() -> JSONResponse:
        try:
            facts = await cache_facts()
            body = asdict(await engine.call_in_engine_thread(instance_load))
        except EngineDeadError as exc:
            return unavailable(exc)
        body.update(facts, num_in_flight=engine.num_in_flight, instance_id=hub.instance_id,
                    model=engine.model_name)
        return JSONResponse(body)

    return hub


__all__ = ["KVEventHub", "add_kv_event_routes", "CacheIdentity"]
