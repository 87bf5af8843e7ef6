"""The router's resilience against misbehaving instances, played by small fake instances beside
one real one: a 503 or a connection dropped before the first token is retried elsewhere, an
instance failing its health checks leaves the pool and comes back when it answers again."""

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from checkpoints import checkpoint_path
from router_harness import RunningApp, wait_until
from rtpllm.router.app import build_router_app
from rtpllm.router.config import RouterConfig
from server_harness import RunningServer, build_async_engine

MODEL = "llama3"


class FakeInstance:
    """Answers the router's polls like an instance; generation answers `mode`."""

    def __init__(self, mode: str):
        self.mode = mode  # "503" or "drop"
        self.healthy = True
        self.generation_calls = 0
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        @app.get("/load")
        async def load() -> JSONResponse:
            return JSONResponse({"num_running": 0, "num_waiting": 0, "block_size": 16, "root_block_hash": 0,
                                 "extra_key": 0, "model_path": None})

        @app.get("/kv_events")
        async def kv_events(request: Request) -> JSONResponse:
            if request.query_params.get("cursor") is not None:
                await asyncio.sleep(0.3)
            return JSONResponse({"instance_id": "fake", "cursor": 0, "block_size": 16, "root_block_hash": 0,
                                 "extra_key": 0, "resync": "subscribe", "snapshot": {}})

        async def generate(request: Request) -> Response:
            self.generation_calls += 1
            return JSONResponse({"error": {"message": "overloaded", "type": "service_unavailable",
                                           "param": None, "code": 503}}, status_code=503)

        app.add_api_route("/v1/completions", generate, methods=["POST"])
        self.app = app if mode == "503" else self._dropping(app)

    def _dropping(self, app):
        """Starts a reply to a completion, then dies: uvicorn drops the connection mid-response."""
        async def asgi(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/v1/completions":
                self.generation_calls += 1
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream"), (b"content-length", b"1000")]})
                raise RuntimeError("the fake instance dies mid-reply (expected in this test)")
            await app(scope, receive, send)
        return asgi


@pytest.fixture(scope="module")
def setup():
    fakes = [FakeInstance("503"), FakeInstance("drop")]
    with RunningServer(build_async_engine(checkpoint_path(MODEL), max_model_len=256, num_blocks=32)) as real, \
            RunningApp(fakes[0].app) as overloaded, RunningApp(fakes[1].app) as dropping:
        config = RouterConfig(backends=(overloaded.url, dropping.url, real.url), policy="round_robin",
                              health_interval_s=0.2, health_timeout_s=1.0, long_prompt_threshold=None)
        with RunningApp(build_router_app(config)) as router:
            yield router, fakes


def test_503_and_dropped_connections_are_retried_on_another_instance(setup):
    router, (overloaded, dropping) = setup
    for i in range(6):
        body = {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 3, "stream": i % 2 == 1}
        response = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    assert overloaded.generation_calls > 0 and dropping.generation_calls > 0
    retries = [line for line in httpx.get(router.url + "/metrics").text.splitlines()
               if line.startswith("rtpllm_router:retries_total")]
    assert any('reason="503"' in line and float(line.split()[-1]) > 0 for line in retries)
    assert any('reason="connection"' in line and float(line.split()[-1]) > 0 for line in retries)


def test_an_instance_failing_health_checks_leaves_the_pool_and_comes_back(setup):
    router, (overloaded, _) = setup
    overloaded.healthy = False
    wait_until(lambda: not router.state()["backends"][0]["healthy"], what="the instance to leave")
    calls = overloaded.generation_calls
    for i in range(3):
        assert httpx.post(router.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": f"x {i}", "max_tokens": 2}).status_code == 200
    assert overloaded.generation_calls == calls  # not tried while out of the pool
    overloaded.healthy = True
    wait_until(lambda: router.state()["backends"][0]["healthy"], what="the instance to come back")


def test_when_every_instance_refuses_the_client_gets_the_503(setup):
    router, (overloaded, dropping) = setup
    config = RouterConfig(backends=(router.state()["backends"][0]["url"],), health_interval_s=0.2)
    with RunningApp(build_router_app(config)) as lone:
        response = httpx.post(lone.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["message"] == "overloaded"
