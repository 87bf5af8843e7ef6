"""The OpenAI-compatible HTTP server: FastAPI app factory and the uvicorn runner.

    app = build_app(AsyncEngine(engine))          # the engine's step thread starts with the app
    run_server(EngineConfig.from_kwargs(...), ServerOptions(port=8000))   # what `rtpllm serve` does

Request bodies are parsed here rather than by FastAPI, so that every kind of bad input (invalid
UTF-8, malformed JSON, wrong types, bad values) answers 400 with OpenAI's error body instead of
FastAPI's 422 layout. Before any handler, `RequestGuard` (request_guard.py) checks the Host, the
API key, the content type and the body's size; docs/security.md describes the whole policy.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Awaitable, Callable, Optional, TypeVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from rtpllm.config import EngineConfig
from rtpllm.engine.async_engine import AsyncEngine, AsyncEngineBase
from rtpllm.engine.gc_heap import freeze_startup_heap
from rtpllm.engine.startup_phases import StartupPhases
from rtpllm.serving import request_params as rp
from rtpllm.serving.chat import create_chat_completion
from rtpllm.serving.completions import create_completion
from rtpllm.serving.context import ServingContext
from rtpllm.serving.errors import OpenAIError, bad_request, from_validation_error, to_openai_error
from rtpllm.serving.hot_routes import HotRoutes
from rtpllm.serving.http_server import ServingServer, uvicorn_config
from rtpllm.serving.kv_events import add_kv_event_routes
from rtpllm.pd.routes import add_pd_routes
from rtpllm.serving.metrics import ServerMetrics
from rtpllm.serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                     check_json_containers)
from rtpllm.serving.request_guard import RequestGuard
from rtpllm.serving.server_options import ServerOptions
from rtpllm.serving.streaming import ClientDisconnected

__all__ = ["ServerOptions", "build_app", "run_server"]
if TYPE_CHECKING:
    from rtpllm.engine.link.process_engine import EngineLaunch

logger = logging.getLogger(__name__)
Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        check_json_containers(raw)
    except ValueError as exc:
        raise bad_request(str(exc), code="request_too_complex") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8: {exc}", code="invalid_utf8") from exc
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def _openai_errors(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Every exception a route lets through becomes an OpenAI-style error reply."""

    @functools.wraps(handler)
    async def wrapped(*args, **kwargs) -> Response:
        try:
            return await handler(*args, **kwargs)
        except (ClientDisconnected, ClientDisconnect):
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except Exception as exc:  # noqa: BLE001 - answered, never raised into the server
            return to_openai_error(exc).response()

    return wrapped


def build_app(engine: AsyncEngineBase, metrics: Optional[ServerMetrics] = None,
              shutdown_grace_period_s: float = 0.0, options: ServerOptions = ServerOptions()) -> FastAPI:
    """The app for one engine, guarded as `options` say. Its lifespan starts the engine's step
    thread and stops it at exit, giving unfinished requests `shutdown_grace_period_s` before
    aborting them."""
    ctx = ServingContext.for_engine(engine, options.trust_request_chat_template)
    metrics = metrics or ServerMetrics(ctx.model_name)
    metrics.attach(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        freeze_startup_heap()  # the app, routes and tokenizer exist now
        try:
            yield
        finally:
            await engine.shutdown(shutdown_grace_period_s)
            ctx.renderer.close()

    docs = {} if options.enable_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    # No slash redirects: a 307 for `/v1/completions/` would make clients resend their body elsewhere.
    app = FastAPI(title="rtp-llm OpenAI-compatible server", lifespan=lifespan, redirect_slashes=False, **docs)
    app.state.serving = ctx
    app.state.metrics = metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(str(exc.detail), status=exc.status_code,
                           type="not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    @app.post("/v1/completions")
    @_openai_errors
    async def completions(request: Request) -> Response:
        arrival_time = time.monotonic()
        body = await parse_body(request, CompletionRequest)
        return await create_completion(ctx, request, body, arrival_time)

    @app.post("/v1/chat/completions")
    @_openai_errors
    async def chat_completions(request: Request) -> Response:
        arrival_time = time.monotonic()
        body = await parse_body(request, ChatCompletionRequest)
        return await create_chat_completion(ctx, request, body, arrival_time)

    # The same two handlers again, ahead of FastAPI's routing (hot_routes.py says why).
    app.add_middleware(HotRoutes, post_routes={"/v1/completions": completions,
                                               "/v1/chat/completions": chat_completions})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=ctx.model_name, max_model_len=ctx.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return OpenAIError("the engine is not running", status=503, type="service_unavailable").response()

    @app.post("/tokenize")
    @_openai_errors
    async def tokenize(request: Request) -> Response:
        body = await parse_body(request, TokenizeRequest)
        rp.check_model(body.model, ctx.model_name)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("prompt: give exactly one of `prompt` and `messages`", param="prompt")
        if body.prompt is not None:
            tokens = await ctx.renderer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            # The template places its own special tokens; the tokenizer adds more only when asked.
            text = await ctx.renderer.render_chat(rp.conversation(body.messages), body.add_generation_prompt,
                                                  None, None)
            tokens = await ctx.renderer.encode(text, add_special_tokens=body.add_special_tokens is True)
        return JSONResponse(TokenizeResponse(count=len(tokens), max_model_len=ctx.max_model_len,
                                             tokens=tokens).model_dump())

    @app.post("/detokenize")
    @_openai_errors
    async def detokenize(request: Request) -> Response:
        body = await parse_body(request, DetokenizeRequest)
        rp.check_model(body.model, ctx.model_name)
        await ctx.renderer.run(len(body.tokens), rp.check_token_ids, body.tokens, ctx.vocab_size, "tokens")
        return JSONResponse(DetokenizeResponse(prompt=await ctx.renderer.decode(body.tokens)).model_dump())

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_kv_event_routes(app, engine)  # GET /kv_events and /load, for rtpllm router
    add_pd_routes(app, ctx)  # POST /internal/pd/decode and /prefill, for rtpllm router --prefill/--decode
    app.add_middleware(RequestGuard, options=options)  # outermost: before HotRoutes and FastAPI
    return app


def _start_engine(config: EngineConfig, options: ServerOptions) -> AsyncEngineBase:
    if options.engine_process:
        from rtpllm.engine.link.process_engine import ProcessEngine

        return ProcessEngine.from_config(config, stream_interval=options.stream_interval)
    return AsyncEngine.from_config(config, stream_interval=options.stream_interval)


def run_server(config: EngineConfig, options: ServerOptions = ServerOptions(),
               engine_launch: Optional["EngineLaunch"] = None, startup: Optional[StartupPhases] = None) -> None:
    """Loads the model, serves until SIGINT/SIGTERM, then shuts down gracefully: the listening
    socket closes, in-flight requests get `options.shutdown_timeout_s` to finish, the rest end
    with a 503 error (streams: an error event and [DONE]) and are aborted (freeing their KV
    blocks), and the step thread stops. `engine_launch` is an engine process the caller already
    started (so that it loads while the caller imports this module)."""
    startup = startup or StartupPhases("server")
    if engine_launch is not None:  # times its two waits: the engine, then this process's tokenizer
        engine: AsyncEngineBase = engine_launch.wait(stream_interval=options.stream_interval, startup=startup)
    else:
        with startup.phase("waiting for the engine"):
            engine = _start_engine(config, options)
    startup.add_process(getattr(engine, "startup_report", None))
    app = build_app(engine, options=options)
    server = ServingServer(uvicorn_config(app, options), engine, options.shutdown_timeout_s)
    logger.info("serving %s (max_model_len=%d) on http://%s:%d%s", engine.model_name, engine.max_model_len,
                options.host, options.port, "" if options.api_key else " without an API key")
    startup.log()
    # uvicorn re-raises the signal it caught once its graceful shutdown is done, so that the signal's
    # previous handler runs. The shutdown above already finished cleanly: swallow it and exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()  # on the event loop `options.loop` names
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if hasattr(engine, "close"):
            engine.close()  # the lifespan already stopped it, unless uvicorn never started (port taken)
    logger.info("server stopped")
