"""Runs the real OpenAI-compatible server on a loopback port inside the test process.

    with RunningServer(build_async_engine(path, num_blocks=64)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

uvicorn serves from a background thread with its own event loop. The engine steps in a thread
beside it (`AsyncEngine`), or, with RTPLLM_TEST_ENGINE=process, in a process of its own
(`ProcessEngine`, what `rtpllm serve` runs): tests/run_all.sh runs the server suites both ways.
The listening socket is bound before the thread starts (port 0: the OS picks a free port), so
there is no race for the port.
"""

from __future__ import annotations

import asyncio
import operator
import os
import re
import socket
import threading
import time
from typing import Any, Awaitable, Callable, Optional, TypeVar

import httpx
import uvicorn

from rtpllm.config import EngineConfig
from rtpllm.engine.async_engine import AsyncEngine, AsyncEngineBase
from rtpllm.engine.engine import Engine
from rtpllm.engine.link.process_engine import ProcessEngine
from rtpllm.serving.http_server import uvicorn_config
from rtpllm.serving.openai_server import ServerOptions, build_app

T = TypeVar("T")


# Picklable, so that it also reaches an engine in another process.
check_kv_pool_free = operator.methodcaller("check_kv_pool_free")


def build_async_engine(model: str, max_queued_requests: Optional[int] = None, **options: Any) -> AsyncEngineBase:
    options.setdefault("num_blocks", 128)
    options.setdefault("block_size", 16)
    config = EngineConfig.from_kwargs(model=model, max_queued_requests=max_queued_requests, **options)
    if os.environ.get("RTPLLM_TEST_ENGINE", "thread") == "process":
        return ProcessEngine.from_config(config)
    return AsyncEngine(Engine(config), config.max_queued_requests)


def run_engine(engine: AsyncEngineBase, body: Callable[[AsyncEngineBase], Awaitable[T]]) -> T:
    """Runs `body(engine)` on a fresh event loop with the engine started, then shuts it down (and
    ends an engine process even if the shutdown failed)."""
    async def main():
        engine.start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown()

    try:
        return asyncio.run(main())
    finally:
        if isinstance(engine, ProcessEngine):
            engine.close()


class UvicornThread:
    """An ASGI app served by uvicorn, in a thread of the test process, on a free loopback port
    (`url`, `port`). `config` is the app's uvicorn configuration; the socket is given to it."""

    def __init__(self, config: uvicorn.Config):
        # NOTE: IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP,
        # and with Nagle on every small SSE chunk would wait for the client's delayed ACK (40 ms).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server ({type(self).__name__}) did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


class RunningServer(UvicornThread):
    def __init__(self, engine: AsyncEngineBase, options: ServerOptions = ServerOptions()):
        self.engine = engine
        self.app = build_app(engine, options=options)
        super().__init__(uvicorn_config(self.app, options, log_level="warning", access_log=False))

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        if isinstance(self.engine, ProcessEngine):
            self.engine.close()  # already stopped by the app's shutdown, unless that failed

    def call_in_engine_thread(self, fn: Callable[[Engine], T]) -> T:
        """Runs `fn(engine)` between two steps (the engine is not thread-safe) and returns its result."""
        future = asyncio.run_coroutine_threadsafe(self.engine.call_in_engine_thread(fn), self.engine.loop)
        return future.result(timeout=30)

    def metric(self, name: str) -> float:
        """The value of one `rtpllm:` metric from /metrics (summed over its label sets)."""
        text = httpx.get(self.url + "/metrics").text
        values = [float(m.group(1)) for m in re.finditer(rf"^rtpllm:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        if not values:
            raise KeyError(f"metric rtpllm:{name} not found")
        return sum(values)

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)
