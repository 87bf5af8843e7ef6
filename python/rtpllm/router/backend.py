"""The instances behind the router: each one's health, load and cache view, kept fresh by three
background loops per instance (health checks, the KV event subscription, load polls).

An instance that fails a health check, or a request's connection, leaves the pool at once (its cache
view is dropped); it comes back when a health check succeeds, and resubscribes to its KV events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import aiohttp

from rtpllm.router.config import RouterConfig
from rtpllm.router.kv_view import KVView

logger = logging.getLogger(__name__)
_KV_POLL_WAIT_S = 2.0  # the long poll's wait on the instance (also how long it can delay the instance's shutdown)
_KV_POLL_GAP_S = 0.005  # between polls: lets a busy instance batch a few steps' events per reply


@dataclass
class Ticket:
    """One request routed to a backend, from dispatch to its last byte."""

    backend: "Backend"
    prefill_tokens: int  # prompt tokens the instance is expected to compute (not cached there)
    long: bool
    prefilling: bool = True
    closed: bool = False

    def first_output(self) -> None:
        """The instance sent the first token: the prompt is computed."""
        if self.prefilling and not self.closed:
            self.prefilling = False
            b = self.backend
            b.pending_prefill_tokens -= self.prefill_tokens
            b.long_prefills -= self.long
            b.decoding += 1
            if self.long:
                b.released.set()  # a long-prefill slot freed up

    def close(self) -> None:
        if self.closed:
            return
        b = self.backend
        if self.prefilling:
            b.pending_prefill_tokens -= self.prefill_tokens
            b.long_prefills -= self.long
        else:
            b.decoding -= 1
        b.in_flight -= 1
        self.closed = True
        b.released.set()


class Backend:
    def __init__(self, url: str, long_lane: bool = False):
        self.url = url
        self.long_lane = long_lane
        self.healthy = True  # optimistic until the first check: a dead one fails over on first use
        self.view = KVView()
        self.load: dict = {}  # the latest GET /load reply
        self.model: Optional[str] = None
        self.model_path: Optional[str] = None
        # What the router itself has sent there (exact and instant, unlike the polled load).
        self.in_flight = 0
        self.pending_prefill_tokens = 0  # prompt tokens still to compute (expected cache hits excluded)
        self.decoding = 0
        self.long_prefills = 0
        self.foreign_requests = 0  # requests other clients had there at the last load report
        self.released = asyncio.Event()  # set whenever a request there ends (wakes the long queue)
        self.routed_total = 0

    def admit(self, prompt_tokens: int, long: bool, cached_tokens: int = 0) -> Ticket:
        """Books a request of `prompt_tokens`, `cached_tokens` of which the instance is expected to
        hold: only the rest is prefill work queued there."""
        prefill_tokens = max(0, prompt_tokens - cached_tokens)
        self.in_flight += 1
        self.pending_prefill_tokens += prefill_tokens
        self.long_prefills += long
        self.routed_total += 1
        return Ticket(self, prefill_tokens, long)

    def take_load_report(self, report: dict) -> None:
        """A GET /load reply. The instance counts every request it holds, this router's included;
        the router's own count at the moment the reply arrived tells how many are someone else's
        (comparing with the count at routing time instead would take requests finished since the
        report for load other clients put there)."""
        report["received_at"] = time.monotonic()
        held = report.get("num_running", 0) + report.get("num_waiting", 0)
        self.foreign_requests = max(0, held - self.in_flight)
        self.load = report

    def mark_down(self, why: str) -> None:
        if self.healthy:
            logger.warning("instance %s leaves the pool: %s", self.url, why)
        self.healthy = False
        self.view.drop()

    def mark_up(self) -> None:
        if not self.healthy:
            logger.info("instance %s is back in the pool", self.url)
        self.healthy = True

    def __repr__(self) -> str:
        return f"Backend({self.url}, healthy={self.healthy}, in_flight={self.in_flight})"


class BackendPool:
    """The backends and the loops that watch them; `start()` and `stop()` on the serving loop.
    One pool per role: the colocated instances (`urls` defaults to `config.backends`), or in
    prefill-decode mode one pool of prefill and one of decode instances."""

    def __init__(self, config: RouterConfig, urls: Optional[Sequence[str]] = None, role: str = "colocated"):
        self.config = config
        self.role = role
        urls = config.backends if urls is None else urls
        self.backends = [Backend(url, url in config.long_lane) for url in urls]
        self.session: Optional[aiohttp.ClientSession] = None
        self._tasks: list[asyncio.Task] = []
        self.changed = asyncio.Event()  # a backend came back (wakes requests waiting for one)

    @property
    def headers(self) -> dict[str, str]:
        key = self.config.backend_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def model_info(self) -> tuple[Optional[str], Optional[str]]:
        for b in self.backends:
            if b.model is not None:
                return b.model, b.model_path
        return None, None

    async def start(self, wait_s: float = 5.0) -> None:
        # No connection limit: every proxied stream holds one; the instances bound their own queues.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, headers=self.headers,
                                             timeout=aiohttp.ClientTimeout(total=None,
                                                                           connect=self.config.connect_timeout_s))
        first_checks = [asyncio.ensure_future(self._check(b)) for b in self.backends]
        for b in self.backends:
            self._tasks += [asyncio.ensure_future(self._health_loop(b)),
                            asyncio.ensure_future(self._kv_loop(b)),
                            asyncio.ensure_future(self._load_loop(b))]
        await asyncio.wait(first_checks, timeout=wait_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.session is not None:
            await self.session.close()

    async def _get_json(self, backend: Backend, path: str, timeout_s: float, **params) -> dict:
        async with self.session.get(backend.url + path, params=params,
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message=f"GET {path} answered {response.status}")
            return await response.json()

    async def _check(self, backend: Backend) -> None:
        timeout = self.config.health_timeout_s
        try:
            async with self.session.get(backend.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                ok = response.status == 200
            if ok and backend.model is None:
                models = await self._get_json(backend, "/v1/models", timeout)
                backend.model = models["data"][0]["id"]
                load = await self._get_json(backend, "/load", timeout)
                backend.model_path = load.get("model_path")
                backend.take_load_report(load)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError, IndexError, ValueError) as exc:
            backend.mark_down(f"health check failed ({type(exc).__name__}: {exc})")
            return
        if ok:
            was_down = not backend.healthy
            backend.mark_up()
            if was_down:
                self.changed.set()
                self.changed = asyncio.Event()
        else:
            backend.mark_down(f"/health answered {response.status}")

    async def _health_loop(self, backend: Backend) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self._check(backend)

    async def _kv_loop(self, backend: Backend) -> None:
        view = backend.view
        while True:
            if not backend.healthy:
                await asyncio.sleep(self.config.health_interval_s / 2)
                continue
            params = {"timeout": str(_KV_POLL_WAIT_S)}
            if view.cursor is not None and view.instance_id is not None:
                params.update(cursor=str(view.cursor), instance_id=view.instance_id)
            try:
                reply = await self._get_json(backend, "/kv_events", _KV_POLL_WAIT_S + self.config.health_timeout_s,
                                             **params)
                view.apply(reply)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError, ValueError) as exc:
                logger.debug("KV events of %s: %r", backend.url, exc)
                view.drop()
                await asyncio.sleep(self.config.health_interval_s / 2)
                continue
            await asyncio.sleep(_KV_POLL_GAP_S)

    async def _load_loop(self, backend: Backend) -> None:
        while True:
            await asyncio.sleep(self.config.load_interval_s)
            if not backend.healthy:
                continue
            try:
                backend.take_load_report(await self._get_json(backend, "/load", self.config.health_timeout_s))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                logger.debug("load of %s: %r", backend.url, exc)
