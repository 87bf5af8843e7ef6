"""The router's HTTP front: the OpenAI API, proxied to the instance the policy picks.

    app = build_router_app(RouterConfig(backends=("http://a:8000", "http://b:8000")))
    run_router(config)                            # what `rtpllm router` does

Generation (POST /v1/completions, /v1/chat/completions) is routed per request: to one colocated
instance (proxy.py), or, with prefill and decode pools, through the PD hand-off (pd_proxy.py). GET
/v1/models and POST /tokenize, /detokenize go to any instance that is up; /health answers 200 while
at least one instance (of each pool) is; /metrics are the router's own (metrics.py); GET
/router/state shows the pools as the router sees them.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional

import aiohttp
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.router.backend import BackendPool
from rtpllm.router.config import RouterConfig
from rtpllm.router.metrics import RouterMetrics
from rtpllm.router.pd_proxy import PDProxy
from rtpllm.router.policy import RoutingPolicy
from rtpllm.router.prompts import PromptReader, load_tokenizer
from rtpllm.router.proxy import Proxy
from rtpllm.serving.errors import OpenAIError, to_openai_error
from rtpllm.serving.request_guard import AccessRules, RequestGuard
from rtpllm.serving.streaming import ClientDisconnected

logger = logging.getLogger(__name__)
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
_PUBLIC_PATHS = ("/health",)  # everything else, /metrics included, needs the key


class RouterState:
    def __init__(self, config: RouterConfig, tokenizer: Optional[Any] = None):
        self.config = config
        if config.pd:
            # The policy (cache hits, lanes) routes over the prefill pool: that is where prompts are
            # computed and cached.
            self.pool = BackendPool(config, config.prefill, "prefill")
            self.decode_pool = BackendPool(config, config.decode, "decode")
            self.pools = (self.decode_pool, self.pool)
        else:
            self.pool = BackendPool(config)
            self.pools = (self.pool,)
        self.policy = RoutingPolicy(config, self.pool)
        self.metrics = RouterMetrics(*self.pools)
        if config.pd:
            self.proxy = PDProxy(self.pool, self.decode_pool, self.policy, self.metrics)
        else:
            self.proxy = Proxy(self.pool, self.policy, self.metrics)
        self.prompts = PromptReader(tokenizer)

    async def start(self) -> None:
        await asyncio.gather(*(pool.start() for pool in self.pools))
        if self.prompts.tokenizer is None:
            self.prompts = PromptReader(await asyncio.to_thread(self._find_tokenizer))

    def _find_tokenizer(self) -> Optional[Any]:
        if self.config.tokenizer is not None:
            return load_tokenizer(self.config.tokenizer)  # asked for: failing to load it is an error
        model_path = next((p for p in (pool.model_info()[1] for pool in self.pools) if p is not None), None)
        if model_path is not None:
            try:
                return load_tokenizer(model_path)
            except (OSError, ValueError) as exc:
                logger.warning("cannot load the tokenizer from the instance's model path %s (%s)", model_path, exc)
        logger.warning("routing without a tokenizer: no cache-aware placement, lanes by estimated length "
                       "(give --tokenizer)")
        return None

    def snapshot(self) -> dict:
        return {"policy": self.config.policy, "tokenizer": self.prompts.tokenizer is not None,
                "backends": [{"url": b.url, "role": pool.role, "healthy": b.healthy, "long_lane": b.long_lane,
                              "in_flight": b.in_flight, "pending_prefill_tokens": b.pending_prefill_tokens,
                              "decoding": b.decoding, "long_prefills": b.long_prefills,
                              "routed_total": b.routed_total, "cached_blocks": len(b.view.held.get("device", ())),
                              "kv_cursor": b.view.cursor, "kv_resyncs": b.view.num_resyncs, "load": b.load}
                             for pool in self.pools for b in pool.backends]}

    def up(self) -> bool:
        """Whether requests can be served: an instance of every pool is up."""
        return all(pool.healthy() for pool in self.pools)


def build_router_app(config: RouterConfig, tokenizer: Optional[Any] = None) -> FastAPI:
    state = RouterState(config, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await asyncio.gather(*(pool.stop() for pool in state.pools))
            state.prompts.close()

    app = FastAPI(title="rtp-llm router", lifespan=lifespan)
    app.state.router = state

    async def generate(request: Request) -> Response:
        try:
            body = await request.body()  # read (and limited) by the guard
            routing, stream = await state.prompts.read(request.url.path, body)
            return await state.proxy.forward(request, request.url.path, body, routing, stream)
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - answered, never raised into the server
            return to_openai_error(exc).response()

    for path in _GENERATION_PATHS:
        app.add_api_route(path, generate, methods=["POST"])

    async def any_instance(method: str, path: str, body: bytes = b"") -> Response:
        for pool in state.pools:
            for backend in pool.healthy():
                try:
                    async with pool.session.request(method, backend.url + path, data=body or None,
                                                    headers={"Content-Type": "application/json"},
                                                    timeout=aiohttp.ClientTimeout(total=30)) as upstream:
                        payload = await upstream.read()
                        return Response(payload, status_code=upstream.status,
                                        media_type=upstream.headers.get("Content-Type", "application/json"))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    backend.mark_down(f"{method} {path} failed ({exc!r})")
        return OpenAIError("no instance is available", status=503, type="service_unavailable").response()

    @app.get("/v1/models")
    async def models() -> Response:
        return await any_instance("GET", "/v1/models")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await any_instance("POST", "/tokenize", await request.body())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await any_instance("POST", "/detokenize", await request.body())

    @app.get("/health")
    async def health() -> Response:
        if state.up():
            return Response(status_code=200)
        return OpenAIError("no instance is up", status=503, type="service_unavailable").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/state")
    async def router_state() -> JSONResponse:
        return JSONResponse(state.snapshot())

    # The same gate as `rtpllm serve` (Host, API key, JSON bodies, body size and read deadline).
    app.add_middleware(RequestGuard, rules=AccessRules(
        bind_host=config.host, allowed_hosts=config.allowed_hosts, api_key=config.api_key, public_paths=_PUBLIC_PATHS,
        max_request_body_bytes=config.max_request_bytes))
    return app


def run_router(config: RouterConfig, log_level: str = "info", access_log: bool = False) -> None:
    app = build_router_app(config)
    if config.pd:
        logger.info("routing prefill-decode (%s over %d prefill, least loaded over %d decode instances) on "
                    "http://%s:%d", config.policy, len(config.prefill), len(config.decode), config.host, config.port)
    else:
        logger.info("routing %s over %d instances on http://%s:%d", config.policy, len(config.backends),
                    config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=access_log,
                timeout_keep_alive=30)
