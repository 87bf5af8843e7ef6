"""Fake prefill and decode instances speaking rtpllm/pd/protocol.py, for the router's PD tests.

    transfer = FakeTransfer()                    # stands in for the KV transfer between the two
    decode, prefill = FakeDecode(transfer), FakePrefill(transfer)
    with RunningApp(decode.app) as d, RunningApp(prefill.app) as p: ...

Both answer the router's polls (/health, /v1/models, /load, /kv_events) and their internal
endpoint. The decode fake reserves "blocks", waits for the prefill fake to deliver the first token
through `FakeTransfer` (across the two servers' event loops), then streams a deterministic
completion: token i is `(first_token + i) % 997`, its text " w<token>" (`expected_tokens`).
Every event it sends is kept (`sent[pd_request_id]`), so tests compare the client's bytes with it.

Failure injection: attributes the tests set (`mode`, delays). What happened to each request is
recorded in `log` as (event, pd_request_id): decode "reserved", "finished", "aborted" (its
connection closed before the end), "kv_timeout"; prefill "started", "done", "aborted".
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.pd.protocol import DecodeRequest, KVDestination, PrefillDestination, PrefillRequest, PrefillResult
from rtpllm.serving.sse_response import SSEResponse
from rtpllm.serving.streaming import ClientDisconnected, cancel_on_disconnect

MODEL = "fake-model"
BLOCK_SIZE = 16
VOCAB = 997


def _error(message: str, status: int, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": status}}


def _sse(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def first_token_for(request: dict) -> int:
    """What the fake prefill "samples": a function of the prompt only."""
    prompt = json.dumps(request.get("prompt", request.get("messages")), sort_keys=True)
    return sum(prompt.encode()) % VOCAB


def prompt_tokens_for(request: dict) -> int:
    prompt = request.get("prompt", request.get("messages"))
    return max(1, len(json.dumps(prompt).split()))


def expected_tokens(request: dict) -> list[int]:
    first = first_token_for(request)
    return [(first + i) % VOCAB for i in range(int(request.get("max_tokens") or 16))]


def expected_text(request: dict) -> str:
    return "".join(f" w{t}" for t in expected_tokens(request))


class FakeTransfer:
    """The KV hand-off between the fakes: decode waits on a future that prefill resolves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    def expect(self, pd_request_id: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiting[pd_request_id] = (loop, future)
        return future

    def forget(self, pd_request_id: str) -> None:
        with self._lock:
            self._waiting.pop(pd_request_id, None)

    def deliver(self, pd_request_id: str, first_token: int) -> bool:
        """False when no decode instance waits for it (it went away)."""
        with self._lock:
            entry = self._waiting.get(pd_request_id)
        if entry is None:
            return False
        loop, future = entry
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(first_token))
        return True


class _FakeInstance:
    def __init__(self, name: str, required_key: Optional[str]):
        self.name = name
        self.required_key = required_key
        self.healthy = True
        self.kv_usage = 0.0
        self.log: list[tuple[str, str]] = []
        self.internal_auth: list[Optional[str]] = []  # the Authorization header of each internal call
        app = FastAPI()

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if self.required_key and request.headers.get("authorization") != f"Bearer {self.required_key}":
                return JSONResponse(_error("bad key", 401, "authentication_error"), status_code=401)
            return await call_next(request)

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]})

        @app.get("/load")
        async def load() -> JSONResponse:
            return JSONResponse({"num_running": 0, "num_waiting": 0, "kv_usage": self.kv_usage, "model_path": None,
                                 "block_size": BLOCK_SIZE, "root_block_hash": 0, "extra_key": 0})

        @app.get("/kv_events")
        async def kv_events(request: Request) -> JSONResponse:
            if request.query_params.get("cursor") is not None:
                await asyncio.sleep(0.5)  # nothing new: the long poll's wait
            return JSONResponse({"instance_id": self.name, "cursor": 0, "block_size": BLOCK_SIZE,
                                 "root_block_hash": 0, "extra_key": 0, "resync": "subscribe", "snapshot": {}})

        self.app = app

    def ids(self, event: str) -> list[str]:
        return [pd_id for e, pd_id in self.log if e == event]


class FakeDecode(_FakeInstance):
    """mode: "ok"; "refuse" (HTTP 503 before any stream); "reserve_error" (an error event instead of
    the reservation, status `reserve_error_status`); "cut" (the connection drops after
    `cut_after` output events). `reserve_delay_s` delays the reservation; `token_delay_s` paces
    output; a KV delivery later than `kv_timeout_s` ends the request with an error event."""

    def __init__(self, transfer: FakeTransfer, name: str = "decode", required_key: Optional[str] = None):
        super().__init__(name, required_key)
        self.transfer = transfer
        self.mode = "ok"
        self.reserve_error_status = 503
        self.reserve_delay_s = 0.0
        self.token_delay_s = 0.0
        self.cut_after = 2
        self.kv_timeout_s = 5.0
        self.sent: dict[str, list[bytes]] = {}
        self.reservations: dict[str, KVDestination] = {}
        self.app.add_api_route("/internal/pd/decode", self._decode, methods=["POST"])

    async def _decode(self, request: Request) -> Response:
        self.internal_auth.append(request.headers.get("authorization"))
        try:
            message = DecodeRequest.from_json(await request.json())
        except ValueError as exc:
            return JSONResponse(_error(str(exc), 400), status_code=400)
        if self.mode == "refuse":  # as `rtpllm serve --role decode` refuses: the status, one error event
            return Response(_sse(_error("overloaded", 503, "service_unavailable")) + b"data: [DONE]\n\n",
                            status_code=503, media_type="text/event-stream")
        sent = self.sent.setdefault(message.pd_request_id, [])
        finished = False

        async def events():
            nonlocal finished
            pd_id, body = message.pd_request_id, message.request
            arrival = self.transfer.expect(pd_id)
            try:
                await asyncio.sleep(self.reserve_delay_s)
                if self.mode == "reserve_error":
                    status = self.reserve_error_status
                    finished = True
                    yield _sse(_error(f"cannot reserve ({status})", status,
                                      "service_unavailable" if status == 503 else "invalid_request_error"))
                    yield b"data: [DONE]\n\n"
                    return
                n = prompt_tokens_for(body)
                destination = KVDestination(pd_request_id=pd_id, transfer_host="127.0.0.1", transfer_port=9,
                                            cache_identity="fake", block_size=BLOCK_SIZE,
                                            blocks=list(range(-(-n // BLOCK_SIZE))), num_prompt_tokens=n)
                self.reservations[pd_id] = destination
                self.log.append(("reserved", pd_id))
                yield _sse({"pd_reserved": destination.to_json()})
                try:
                    first = await asyncio.wait_for(arrival, self.kv_timeout_s)
                except asyncio.TimeoutError:
                    self.log.append(("kv_timeout", pd_id))
                    finished = True
                    error = _error("the KV cache did not arrive in time", 0, "pd_transfer_failed")
                    error["error"]["code"] = "pd_transfer_failed"  # as the real decode side says it
                    yield _sse(error)
                    yield b"data: [DONE]\n\n"
                    return
                for i, event in enumerate(_output_events(message, first)):
                    if self.mode == "cut" and i == self.cut_after:
                        raise RuntimeError("the fake decode instance dies mid-stream (expected in this test)")
                    if i and self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    sent.append(event)
                    yield event
                finished = True
                self.log.append(("finished", pd_id))
                yield b"data: [DONE]\n\n"
            finally:
                self.transfer.forget(pd_id)

        def on_close() -> None:
            if not finished:
                self.log.append(("aborted", message.pd_request_id))

        return SSEResponse(events(), on_close=on_close)


def _output_events(message: DecodeRequest, first: int) -> list[bytes]:
    body = message.request
    tokens = [(first + i) % VOCAB for i in range(int(body.get("max_tokens") or 16))]
    usage = {"prompt_tokens": prompt_tokens_for(body), "completion_tokens": len(tokens),
             "total_tokens": prompt_tokens_for(body) + len(tokens)}
    chat = message.endpoint == "chat"
    base = {"id": message.pd_request_id, "created": 0, "model": MODEL}
    if not body.get("stream"):
        text = "".join(f" w{t}" for t in tokens)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            return [_sse({**base, "object": "chat.completion", "choices": [choice], "usage": usage})]
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return [_sse({**base, "object": "text_completion", "choices": [choice], "usage": usage})]
    events = []
    for i, t in enumerate(tokens):
        finish = "length" if i == len(tokens) - 1 else None
        if chat:
            delta = {"role": "assistant", "content": f" w{t}"} if i == 0 else {"content": f" w{t}"}
            events.append(_sse({**base, "object": "chat.completion.chunk",
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
        else:
            events.append(_sse({**base, "object": "text_completion",
                                "choices": [{"index": 0, "text": f" w{t}", "logprobs": None,
                                             "finish_reason": finish}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(_sse({**base, "object": "chat.completion.chunk" if chat else "text_completion",
                            "choices": [], "usage": usage}))
    return events


class FakePrefill(_FakeInstance):
    """mode: "ok"; "503" (answers 503 at once); "hang" (never answers until the router lets go);
    "drop" (the connection drops without an answer). `delay_s` delays an ok answer."""

    def __init__(self, transfer: FakeTransfer, name: str = "prefill", required_key: Optional[str] = None):
        super().__init__(name, required_key)
        self.transfer = transfer
        self.mode = "ok"
        self.delay_s = 0.0
        self.destinations: dict[str, KVDestination] = {}
        self._destination_waits: dict[str, asyncio.Future] = {}  # prefills sent without one (overlap)
        self.app.add_api_route("/internal/pd/prefill", self._prefill, methods=["POST"])
        self.app.add_api_route("/internal/pd/prefill/destination", self._destination, methods=["POST"])
        self.app = self._with_drop(self.app)

    async def _destination(self, request: Request) -> Response:
        self.internal_auth.append(request.headers.get("authorization"))
        try:
            message = PrefillDestination.from_json(await request.json())
        except ValueError as exc:
            return JSONResponse(_error(str(exc), 400), status_code=400)
        self.destinations[message.pd_request_id] = message.destination
        waiting = self._destination_waits.get(message.pd_request_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(message.destination)
        return JSONResponse({})

    def _with_drop(self, app):
        async def asgi(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/internal/pd/prefill" and self.mode == "drop":
                self.log.append(("dropped", ""))
                raise RuntimeError("the fake prefill instance dies (expected in this test)")
            await app(scope, receive, send)
        return asgi

    async def _prefill(self, request: Request) -> Response:
        self.internal_auth.append(request.headers.get("authorization"))
        try:
            message = PrefillRequest.from_json(await request.json())
        except ValueError as exc:
            return JSONResponse(_error(str(exc), 400), status_code=400)
        pd_id = message.pd_request_id
        if message.destination is not None:
            self.destinations[pd_id] = message.destination
        self.log.append(("started", pd_id))
        if self.mode == "503":
            self.log.append(("refused", pd_id))
            return JSONResponse(_error("prefill overloaded", 503, "service_unavailable"), status_code=503)
        try:
            await cancel_on_disconnect(request, asyncio.sleep(3600 if self.mode == "hang" else self.delay_s))
        except ClientDisconnected:
            self.log.append(("aborted", pd_id))
            return Response(status_code=499)
        destination = self.destinations.get(pd_id)
        if destination is None:  # overlap: it follows the request
            waiting = self._destination_waits.setdefault(pd_id, asyncio.get_running_loop().create_future())
            try:
                destination = await cancel_on_disconnect(request, asyncio.wait_for(waiting, 30))
            except ClientDisconnected:
                self.log.append(("aborted", pd_id))
                return Response(status_code=499)
            except asyncio.TimeoutError:
                return JSONResponse(_error("no destination came", 504, "timeout"), status_code=504)
            finally:
                self._destination_waits.pop(pd_id, None)
        first = first_token_for(message.request)
        if not self.transfer.deliver(pd_id, first):
            self.log.append(("decode_gone", pd_id))
            return JSONResponse(_error("the decode side is gone", 503, "service_unavailable"), status_code=503)
        self.log.append(("done", pd_id))
        n = destination.num_prompt_tokens
        return JSONResponse(PrefillResult(pd_request_id=pd_id, prompt_tokens=n, first_token=first,
                                          transferred_blocks=len(destination.blocks),
                                          transferred_bytes=1000 * len(destination.blocks)).to_json())
