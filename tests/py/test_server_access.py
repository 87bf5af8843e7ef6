"""Access control and request limits of `rtpllm serve` (issue 15): API key, Host check, content
type, body size, header and body read timeouts, the connection cap, docs off by default, and a
client that hangs up mid-upload."""

import logging
import socket
import time

import httpx
import pytest

from checkpoints import checkpoint_path
from rtpllm.serving.cli import build_parser
from rtpllm.serving.openai_server import ServerOptions
from rtpllm.serving.request_guard import HostPolicy
from rtpllm.serving.server_options import server_option_kwargs
from server_harness import RunningServer, build_async_engine

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
MAX_CONNECTIONS = 12
OPTIONS = ServerOptions(api_key=KEY, max_request_body_bytes=BODY_LIMIT, header_read_timeout_s=0.5,
                        body_read_timeout_s=0.5, max_connections=MAX_CONNECTIONS)
COMPLETION = {"prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def server():
    engine = build_async_engine(checkpoint_path("llama3"), max_model_len=256, num_blocks=32)
    with RunningServer(engine, OPTIONS) as running:
        yield running


def _assert_error(response: httpx.Response, status: int, code=None, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def _raw(server, data: bytes, timeout: float = 5.0) -> bytes:
    """Sends `data` on a fresh connection and returns everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_api_key_is_required_except_on_public_paths(server):
    missing = httpx.post(server.url + "/v1/completions", json=COMPLETION)
    _assert_error(missing, 401, code="invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer nope"})
    _assert_error(wrong, 401, code="invalid_api_key")
    _assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.post(server.url + "/v1/completions", json=COMPLETION, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_api_key_flag_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("RTPLLM_API_KEY", "from-env")
    args = build_parser().parse_args(["serve"])
    assert server_option_kwargs(args)["api_key"] == "from-env"
    args = build_parser().parse_args(["serve", "--api-key", "from-flag", "--public-paths"])
    options = server_option_kwargs(args)
    assert options["api_key"] == "from-flag" and options["public_paths"] == ()


def test_foreign_host_and_non_json_bodies_are_refused(server):
    # What a web page on the same machine could send: text/plain needs no CORS preflight.
    browser = httpx.post(server.url + "/v1/completions", content=b'{"prompt":"Hi","max_tokens":1}',
                         headers={**AUTH, "Content-Type": "text/plain", "Origin": "http://evil.example"})
    _assert_error(browser, 415, param="Content-Type")
    rebound = httpx.post(server.url + "/v1/completions", json=COMPLETION,
                         headers={**AUTH, "Host": "attacker.example"})
    _assert_error(rebound, 400, code="invalid_host")
    local = httpx.post(server.url + "/v1/completions", json=COMPLETION,
                       headers={**AUTH, "Host": f"localhost:{server.port}"})
    assert local.status_code == 200
    charset = httpx.post(server.url + "/v1/completions", content=b'{"prompt":"Hi","max_tokens":1}',
                         headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert charset.status_code == 200


def test_host_policy():
    loopback = HostPolicy("127.0.0.1")
    assert all(loopback.allows(h) for h in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:80", None))
    assert not loopback.allows("attacker.example") and not loopback.allows("127.0.0.1.evil.example")
    assert HostPolicy("0.0.0.0").allows("llm.internal.svc")  # bound everywhere with no list: any host
    listed = HostPolicy("0.0.0.0", ("api.example.com", "*.corp.example"))
    assert listed.allows("api.example.com:443") and listed.allows("llm.corp.example")
    assert not listed.allows("corp.example.evil") and not listed.allows("localhost")
    assert HostPolicy("10.0.0.5").allows("10.0.0.5:8000") and not HostPolicy("10.0.0.5").allows("localhost")


def test_request_bodies_over_the_limit_get_413_before_they_are_read(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n").encode()
    start = time.monotonic()
    reply = _raw(server, head + b'{"prompt": "')  # 100 MB announced, a few bytes sent
    assert time.monotonic() - start < 2.0
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
    # Without a Content-Length (chunked), the limit is checked while the body arrives.
    chunks = (b'{"prompt": "' + b"a" * 4096 for _ in range(BODY_LIMIT // 4096 + 2))
    chunked = httpx.post(server.url + "/v1/completions", content=chunks,
                         headers={**AUTH, "Content-Type": "application/json"})
    _assert_error(chunked, 413, code="request_too_large")


def test_half_sent_requests_are_timed_out(server):
    # Headers never finished: the connection is closed (OPTIONS.header_read_timeout_s = 0.5).
    start = time.monotonic()
    assert _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-") == b""
    assert 0.4 < time.monotonic() - start < 3.0
    # Body never finished: a 408, then the connection closes.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    start = time.monotonic()
    reply = _raw(server, head + b'{"pro')
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert time.monotonic() - start < 3.0
    assert httpx.get(server.url + "/health").status_code == 200


def test_connections_beyond_the_cap_get_503(server):
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        for sock in sockets:
            sock.close()
    server.wait_until(lambda: httpx.get(server.url + "/health").status_code == 200, what="the cap to free up")


def test_client_hanging_up_mid_upload_is_not_an_error(server, caplog):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    with caplog.at_level(logging.DEBUG):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(head + b'{"pro')
        time.sleep(0.3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "disconnected while sending its request body" in caplog.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_docs_are_off_by_default(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        _assert_error(httpx.get(server.url + path, headers=AUTH), 404)


@pytest.mark.parametrize("pieces", [1, 40], ids=["one-read", "trickled"])
def test_oversized_headers_get_431(server, pieces):
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Filler: aaaaaaaaaa\r\n" * 5000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        size = len(request) // pieces + 1
        try:
            for start in range(0, len(request), size):
                sock.sendall(request[start:start + size])
        except OSError:
            pass  # refused while we were still sending
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 431") and b"request_header_too_large" in reply
    assert httpx.get(server.url + "/health").status_code == 200
