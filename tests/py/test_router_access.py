"""The router's access checks: API key (everything but /health needs it), the backend key it uses
itself, request size, Host header. One instance behind it, which demands the router's own key."""

import httpx
import openai
import pytest

from checkpoints import checkpoint_path
from router_harness import RunningApp, wait_until
from rtpllm.router.app import build_router_app
from rtpllm.router.config import RouterConfig
from rtpllm.serving.server_options import ServerOptions
from server_harness import RunningServer, build_async_engine

KEY, BACKEND_KEY = "client-secret", "router-secret"
PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/metrics"), ("GET", "/router/state"), ("POST", "/tokenize"), ("POST", "/detokenize")]


@pytest.fixture(scope="module")
def instance():
    # The instance takes only the router's key (`rtpllm serve --api-key`).
    server = RunningServer(build_async_engine(checkpoint_path("llama3"), max_model_len=256, num_blocks=32),
                           ServerOptions(api_key=BACKEND_KEY))
    with server:
        yield server


@pytest.fixture(scope="module")
def router(instance):
    config = RouterConfig(backends=(instance.url,), api_key=KEY, backend_api_key=BACKEND_KEY,
                          max_request_bytes=4096, allowed_hosts=("127.0.0.1", "localhost"), health_interval_s=0.2)
    with RunningApp(build_router_app(config)) as running:
        auth = {"Authorization": f"Bearer {KEY}"}
        wait_until(lambda: running.state(auth)["backends"][0]["kv_cursor"] is not None, what="the subscription")
        yield running


@pytest.mark.parametrize("method, path", PROTECTED)
def test_every_endpoint_but_health_needs_the_key(router, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.request(method, router.url + path, json={}, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.json()["error"]["code"] == "invalid_api_key"  # serve's guard, OpenAI's code
    assert httpx.get(router.url + "/health").status_code == 200


def test_with_the_key_the_openai_client_works(router):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llama3"]
    text = client.completions.create(model="llama3", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
    chunks = client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, temperature=0, stream=True)
    assert isinstance(text, str) and any(c.choices and c.choices[0].delta.content for c in chunks)


def test_the_instance_refuses_clients_without_the_routers_key(instance):
    assert httpx.get(instance.url + "/v1/models").status_code == 401
    assert httpx.get(instance.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401


def test_oversized_bodies_get_413(router):
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(router.url + "/v1/completions", headers=auth,
                          json={"model": "llama3", "prompt": "x" * 5000, "max_tokens": 1})
    assert response.status_code == 413

    def chunked():  # no Content-Length: the limit applies while the body is read
        yield b'{"model": "llama3", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(router.url + "/v1/completions", headers={**auth, "Content-Type": "application/json"},
                          content=chunked())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_an_unknown_host_header_gets_400(router):
    response = httpx.get(router.url + "/health", headers={"Host": "evil.example:80"})
    assert response.status_code == 400
    assert httpx.get(router.url + "/health", headers={"Host": "localhost:1234"}).status_code == 200
