"""Fuzzing `rtpllm serve` with generated hostile requests (issue 15).

One server, its engine in a process of its own as `rtpllm serve` runs it, with an API key and a
small body limit. Every generated request has at least one defect (a wrong type, a value out of
range, NaN, an oversized prompt, broken JSON or UTF-8, a wrong method, path, content type, Host or
key, or malformed HTTP), often on top of other random but valid fields. Every answer must be a 4xx
with an OpenAI-style JSON error (uvicorn's own plain refusal, or a closed connection, for malformed
HTTP), never a 5xx; afterwards the server must be healthy, serve a valid request, and hold no KV
block. The seed is fixed, so a failure replays; the failing request is in the assertion message.
"""

import json
import random
import socket

import httpx
import pytest

from checkpoints import checkpoint_path
from rtpllm.config import EngineConfig
from rtpllm.engine.link.process_engine import ProcessEngine
from rtpllm.serving.openai_server import ServerOptions
from server_harness import RunningServer, check_kv_pool_free

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 128
OPTIONS = ServerOptions(api_key=KEY, max_request_body_bytes=256 * 1024, header_read_timeout_s=2.0,
                        body_read_timeout_s=2.0)
NAN, INF = float("nan"), float("inf")

BASE = {
    "/v1/completions": {"prompt": "hello", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}
_SAMPLING_BAD = {
    "n": [0, -1, 10**6, 2**64, "2", 1.5, True, None],
    "max_tokens": [0, -5, 10**12, 2**64, "5", 2.5, True, [], {}],
    "temperature": [-1, -1e-9, "hot", [], {}, True, NAN, INF, -INF],
    "top_p": [0, -0.1, 1.5, 1e308, NAN, "x", "1"],
    "top_k": [-2, 2**70, -2**70, 1.5, "3"],
    "min_p": [-0.1, 1.1, NAN, INF],
    "presence_penalty": [-2.5, 3, NAN, INF, "0"],
    "frequency_penalty": [-2.5, 3, NAN, -INF],
    "repetition_penalty": [0, -1, NAN, INF],
    "seed": [2**64, -2**63 - 1, 10**30, 1.5, "1"],
    "stop": [[1, 2], 5, {"a": 1}, [""], [None], "", ["s"] * 100, "s" * 5000],
    "stop_token_ids": [[-1], [10**9], "1", [1.5], [2**64], [1] * 2000],
    "min_tokens": [-1, 10**9, "1"],
    "stream": [1, "true", None],
    "stream_options": ["x", {"include_usage": "yes"}],
    "model": ["nope", 5, ""],
    "ignore_eos": [1, "no"],
    "user": [5, []],
}
BAD = {
    "/v1/completions": {
        **_SAMPLING_BAD,
        "prompt": ["", [], [[]], [-1], [10**9], 12, 1.5, None, {"a": 1}, [1, "a"], ["a", 1], "x " * 2000,
                   [5] * 300, [[1, 2], []], [2**64], [[1, 2], "a", [3, -4]]],
        "logprobs": [-1, 21, 10**9, True, "2"],
        "echo": [1, "yes"],
        "suffix": ["x"],
        "best_of": [2, "x", 0],
    },
    "/v1/chat/completions": {
        **_SAMPLING_BAD,
        "messages": [[], "hi", [{}], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], None,
                     [{"role": "user", "content": "x " * 3000}], [{"role": "user", "content": "hi"}, 7]],
        "tools": [[{"type": "function"}]],
        "tool_choice": ["auto", {"type": "function"}],
        "response_format": [{"type": "json_object"}],
        "top_logprobs": [-1, 50, "2"],
        "logprobs": ["x", 1],
        "max_completion_tokens": [0, -1, 10**9],
        "chat_template": ["{{ x }}", 5],
        "chat_template_kwargs": [{"chat_template": "x"}, {"tokenize": True}, "x", {"conversation": []}],
        "add_generation_prompt": [1, "no"],
    },
    "/tokenize": {
        "prompt": [5, [], {"a": 1}],
        "messages": ["x", [{"role": "wizard"}], []],
        "add_special_tokens": ["yes", 1],
        "model": ["nope"],
    },
    "/detokenize": {"tokens": [[-1], [10**9], "x", [1.5], [2**64], None], "model": ["nope", 3]},
}
# Random but valid extras, mixed into some requests to reach deeper code paths.
_VALID_EXTRAS = {"temperature": [0.0, 0.7, 2.0], "top_p": [0.5, 1.0], "top_k": [-1, 0, 5], "seed": [0, 7, -3],
                 "stream": [True, False], "user": ["u"], "ignore_eos": [True], "min_p": [0.0, 0.1]}


class Case:
    def __init__(self, kind: str, method: str = "POST", path: str = "/v1/completions", body: bytes = b"",
                 headers: dict = None, raw: bytes = b""):
        self.kind, self.method, self.path, self.body, self.raw = kind, method, path, body, raw
        self.headers = {"Content-Type": "application/json", **AUTH, **(headers or {})}

    def __repr__(self) -> str:
        what = self.raw[:300] if self.raw else (self.method, self.path, self.headers, self.body[:300])
        return f"<{self.kind}: {what!r}>"


def _dumps(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals, as a careless client sends


def _bad_body(rng: random.Random, path: str) -> dict:
    body = dict(BASE[path])
    if path in ("/v1/completions", "/v1/chat/completions"):
        for field in rng.sample(sorted(_VALID_EXTRAS), rng.randrange(3)):
            body[field] = rng.choice(_VALID_EXTRAS[field])
    for field in rng.sample(sorted(BAD[path]), 1 + (rng.random() < 0.2)):
        body[field] = rng.choice(BAD[path][field])
    if path == "/tokenize" and rng.random() < 0.3:
        body = {"prompt": "a", "messages": [{"role": "user", "content": "b"}]} if rng.random() < 0.5 else {}
    return body


def _generate(rng: random.Random) -> list:
    cases = []
    paths = list(BASE)
    for _ in range(330):  # a bad field value, the rest of the body valid
        path = rng.choice(paths)
        cases.append(Case("field", path=path, body=_dumps(_bad_body(rng, path))))
    for _ in range(110):  # broken encodings and structure
        path = rng.choice(paths)
        valid = _dumps(_bad_body(rng, path))
        mutation = rng.randrange(9)
        if mutation == 0:
            body = valid[:rng.randrange(1, len(valid))]  # truncated JSON
        elif mutation == 1:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif mutation == 2:
            cut = valid.find(b'"', 2) + 1  # inside the first string (or at the start of the body)
            body = valid[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]) + valid[cut:]
        elif mutation == 3:
            body = valid.decode().encode(rng.choice(["utf-16", "utf-32", "utf-8-sig"]))
        elif mutation == 4:
            body = rng.choice([b"[]", b'"x"', b"5", b"null", b"true", b"", b"{}"])
        elif mutation == 5:
            depth = rng.choice([100, 1000, 20000])
            body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "max_tokens": 1}'
        elif mutation == 6:
            body = valid[:-1] + b', "max_tokens": 1e999, "prompt": "\\ud800"}'
        elif mutation == 7:
            body = b'{"prompt": "' + b"a" * (300 * 1024) + b'"}'  # over the body limit
        else:
            body = valid[:-1] + b', "temperature": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400"]) + b"}"
        cases.append(Case("encoding", path=path, body=body))
    for _ in range(90):  # headers: content type, key, host
        path = rng.choice(paths)
        body = _dumps(BASE[path]) if rng.random() < 0.5 else _dumps(_bad_body(rng, path))
        which = rng.randrange(3)
        if which == 0:
            headers = {"Content-Type": rng.choice(["text/plain", "", "application/x-www-form-urlencoded",
                                                   "multipart/form-data; boundary=x", "application/jsonx",
                                                   "application/json; charset=latin-1", "*/*", "json"])}
        elif which == 1:
            headers = {"Authorization": rng.choice(["", "Bearer", "Bearer nope", f"Basic {KEY}", KEY,
                                                    f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"])}
        else:
            headers = {"Host": rng.choice(["evil.example", "127.0.0.1.evil.example", "localhost.evil", "x" * 300,
                                           "evil.example:8000"])}
        cases.append(Case("header", path=path, body=body, headers=headers))
    for _ in range(50):  # methods and paths
        if rng.random() < 0.5:
            cases.append(Case("method", method=rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
                              path=rng.choice(paths), body=_dumps(BASE["/v1/completions"])))
        else:
            path = rng.choice(["/v1/nothing", "/v1/completions/", "/V1/completions", "/v1//completions",
                               "/docs", "/openapi.json", "/redoc", "/" + "a" * 5000, "/v1/%ff", "/health/x"])
            cases.append(Case("path", method=rng.choice(["GET", "POST"]), path=path, body=_dumps(BASE["/tokenize"])))
    raw_requests = [
        b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: a\x00b\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Many: 1\r\n" * 10000 + b"\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n"
        b"Authorization: Bearer "
        + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer "
        + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"prompt\": 5}",
    ]
    for _ in range(80):
        cases.append(Case("raw", raw=rng.choice(raw_requests)))
    rng.shuffle(cases)
    return cases


@pytest.fixture(scope="module")
def server():
    config = EngineConfig.from_kwargs(model=checkpoint_path("llama3"), max_model_len=MAX_MODEL_LEN, num_blocks=64,
                                      block_size=16, max_num_seqs=8)
    with RunningServer(ProcessEngine.from_config(config), OPTIONS) as running:
        yield running


def _send_raw(server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except OSError:  # refused and closed while we were still sending
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"no answer and still open after 10s: {data[:300]!r}, got {received[:300]!r}")
        return received


def _check_raw(case: Case, reply: bytes) -> None:
    if not reply:
        return  # closed without an answer: uvicorn's refusal for some malformed HTTP
    status_line, _, rest = reply.partition(b"\r\n")
    status = int(status_line.split()[1])
    assert 400 <= status < 500, (case, reply[:500])
    head, _, body = rest.partition(b"\r\n\r\n")
    if b"application/json" in head.lower():
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}, (case, reply[:500])


def _check(case: Case, response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:500])
    if response.status_code == 413 and not response.content:
        return
    assert response.headers.get("content-type", "").startswith("application/json"), (case, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], (case, error)


def _run(server, client: httpx.Client, case: Case) -> None:
    if case.raw:
        _check_raw(case, _send_raw(server, case.raw))
        return
    headers = {k: v for k, v in case.headers.items() if v or k != "Content-Type"}
    try:
        response = client.request(case.method, case.path, content=case.body or None, headers=headers)
    except httpx.RemoteProtocolError:  # the server refused and closed before reading the whole body
        assert case.kind == "encoding", case
        return
    _check(case, response)


def test_hostile_requests_get_4xx_and_leave_the_server_healthy(server):
    cases = _generate(random.Random(15))
    assert len(cases) >= 500
    failures = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for case in cases:
            try:
                _run(server, client, case)
            except AssertionError as failure:
                failures.append(str(failure)[:600])
        assert not failures, f"{len(failures)} of {len(cases)} requests failed:\n" + "\n".join(failures[:20])
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    server.wait_until(lambda: server.metric("num_requests_running") == 0, what="no running request")
    assert server.metric("kv_cache_blocks_used") == 0
    assert server.call_in_engine_thread(check_kv_pool_free)
