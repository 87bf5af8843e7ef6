"""`rtpllm router --prefill ... --decode ...` against fake instances that speak the PD protocol
(pd_fakes.py): the relay (streamed and not, completions and chat), the failure policy (prefill
503 / hang / connection refused / dropped, decode reservation errors, slow reservations, a stream
cut mid-way, `--pd-retry`), disconnects closing both upstreams, pool selection, access control;
with the reservation overlapped with the prefill and without."""

import json
import socket
import time

import httpx
import openai
import pytest

from checkpoints import checkpoint_path
from pd_fakes import MODEL, FakeDecode, FakePrefill, FakeTransfer, expected_text
from router_harness import RunningApp, wait_until
from rtpllm.router.app import build_router_app
from rtpllm.router.config import RouterConfig
from rtpllm.router.prompts import load_tokenizer

KEY, BACKEND_KEY = "client-secret", "router-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 1.0


def pd_config(prefill, decode, **overrides) -> RouterConfig:
    options = dict(prefill=tuple(prefill), decode=tuple(decode), api_key=KEY, backend_api_key=BACKEND_KEY,
                   health_interval_s=0.2, health_timeout_s=1.0, load_interval_s=0.05, long_prompt_threshold=None,
                   pd_reserve_timeout_s=TIMEOUT_S, pd_prefill_timeout_s=TIMEOUT_S, max_retries=2)
    options.update(overrides)
    return RouterConfig(**options)


class Setup:
    def __init__(self, transfer, decodes, prefills, router, retrying, tokenizer):
        self.transfer, self.decodes, self.prefills = transfer, decodes, prefills
        self.router, self.retrying, self.tokenizer = router, retrying, tokenizer

    def reset(self):
        for fake in self.decodes + self.prefills:
            fake.mode, fake.healthy, fake.kv_usage = "ok", True, 0.0
            fake.log.clear()
        for d in self.decodes:
            d.reserve_delay_s = d.token_delay_s = 0.0
            d.reserve_error_status = 503
        for p in self.prefills:
            p.delay_s = 0.0

    def decode_with(self, pd_id):
        return next(d for d in self.decodes if pd_id in d.sent or pd_id in d.reservations)


@pytest.fixture(scope="module", params=[True, False], ids=["overlap", "sequential"])
def module_setup(request):
    """Every test runs against routers that overlap the reservation with the prefill (the prefill
    request first, its destination following) and routers that send one after the other."""
    overlap = request.param
    transfer = FakeTransfer()
    decodes = [FakeDecode(transfer, f"decode{i}", BACKEND_KEY) for i in range(2)]
    prefills = [FakePrefill(transfer, f"prefill{i}", BACKEND_KEY) for i in range(2)]
    tokenizer = load_tokenizer(checkpoint_path("llama3"))
    with RunningApp(decodes[0].app) as d0, RunningApp(decodes[1].app) as d1, \
            RunningApp(prefills[0].app) as p0, RunningApp(prefills[1].app) as p1:
        urls = dict(prefill=(p0.url, p1.url), decode=(d0.url, d1.url))
        with RunningApp(build_router_app(pd_config(**urls, pd_overlap=overlap), tokenizer)) as router, \
                RunningApp(build_router_app(pd_config(**urls, pd_retry=True, pd_overlap=overlap), tokenizer)) as retrying:
            for r in (router, retrying):
                wait_until(lambda: all(b["kv_cursor"] is not None for b in r.state(AUTH)["backends"]),
                           what="the KV subscriptions")
            yield Setup(transfer, decodes, prefills, router, retrying, tokenizer)


@pytest.fixture
def setup(module_setup):
    module_setup.reset()
    yield module_setup
    module_setup.reset()


def post(router, body, path="/v1/completions", **kwargs):
    return httpx.post(router.url + path, json=body, headers=AUTH, timeout=30, **kwargs)


def metric(router, name: str, **labels) -> float:
    text = httpx.get(router.url + "/metrics", headers=AUTH).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"rtpllm_router:{name}") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


def sse_events(raw: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e.strip()]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": "hello there", "max_tokens": 5, "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "stream": True, "stream_options": {"include_usage": True}}),
])
def test_a_stream_is_decodes_output_relayed_unchanged(setup, path, body):
    ok_before = metric(setup.router, "pd_requests_total", outcome="ok")
    response = post(setup.router, body, path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)
    assert events[-1] == b"data: [DONE]\n\n"
    pd_id = json.loads(events[0][6:])["id"]  # the fake names its chunks by the pd_request_id
    decode = setup.decode_with(pd_id)
    assert events[:-1] == decode.sent[pd_id]  # byte for byte; the reservation event stays in the router
    prefill = next(p for p in setup.prefills if pd_id in p.destinations)
    assert prefill.destinations[pd_id] == decode.reservations[pd_id]  # prefill writes where decode reserved
    wait_until(lambda: metric(setup.router, "pd_requests_total", outcome="ok") == ok_before + 1,
               what="the outcome to be counted")  # counted as the stream closes, just after [DONE] went out


def test_non_streamed_and_chat_requests_through_the_openai_client(setup):
    client = openai.OpenAI(base_url=setup.router.url + "/v1", api_key=KEY, max_retries=0)
    body = {"prompt": "The capital of France is", "max_tokens": 6}
    completion = client.completions.create(model=MODEL, **body)
    assert completion.choices[0].text == expected_text(body)
    assert completion.usage.completion_tokens == 6
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert chat.choices[0].message.content == expected_text({"messages": messages, "max_tokens": 3})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 3
    assert [m.id for m in client.models.list().data] == [MODEL]
    # Every pd_request_id is unique, and the instances got the router's key on the internal endpoints.
    ids = [i for d in setup.decodes for i in d.ids("reserved")]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert {a for f in setup.decodes + setup.prefills for a in f.internal_auth} == {f"Bearer {BACKEND_KEY}"}


def test_without_the_key_every_endpoint_but_health_answers_401(setup):
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/metrics"), ("GET", "/router/state")]:
        response = httpx.request(method, setup.router.url + path, json={"model": MODEL, "prompt": "x"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(setup.router.url + "/health").status_code == 200
    assert not any(d.log for d in setup.decodes)  # nothing reached an instance


@pytest.mark.parametrize("stream", [False, True])
def test_a_prefill_503_ends_the_request_with_an_openai_error_and_frees_the_reservation(setup, stream):
    for p in setup.prefills:
        p.mode = "503"
    failed_before = metric(setup.router, "pd_requests_total", outcome="prefill_failed")
    response = post(setup.router, {"model": MODEL, "prompt": "x y z", "max_tokens": 3, "stream": stream})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "service_unavailable" and "prefill overloaded" in error["message"]
    (pd_id,) = [i for d in setup.decodes for i in d.ids("reserved")]
    wait_until(lambda: pd_id in setup.decode_with(pd_id).ids("aborted"), what="decode to abort")
    assert sum(len(p.ids("refused")) for p in setup.prefills) == 1  # no retry without --pd-retry
    assert metric(setup.router, "pd_requests_total", outcome="prefill_failed") == failed_before + 1
    assert metric(setup.router, "pd_prefill_failures_total", reason="status_503") >= 1


def test_a_hanging_prefill_times_out_and_both_instances_are_let_go(setup):
    for p in setup.prefills:
        p.mode = "hang"
    started = time.monotonic()
    response = post(setup.router, {"model": MODEL, "prompt": "slow one", "max_tokens": 3})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 3
    (pd_id,) = [i for d in setup.decodes for i in d.ids("reserved")]
    prefill = next(p for p in setup.prefills if pd_id in p.ids("started"))
    wait_until(lambda: pd_id in prefill.ids("aborted") and pd_id in setup.decode_with(pd_id).ids("aborted"),
               what="both instances to see the request closed")
    assert metric(setup.router, "pd_prefill_failures_total", reason="timeout") >= 1


def test_decodes_own_error_before_output_reaches_the_client_and_the_prefill_is_let_go(setup):
    for d in setup.decodes:
        d.kv_timeout_s = 0.2
    for p in setup.prefills:
        p.delay_s = 0.8  # slower than decode's wait for the KV (and within the router's prefill timeout)
    try:
        response = post(setup.router, {"model": MODEL, "prompt": "too late", "max_tokens": 2, "stream": True})
    finally:
        for d in setup.decodes:
            d.kv_timeout_s = 5.0
    assert response.status_code == 503
    assert response.json()["error"] == {"message": "the KV cache did not arrive in time", "type": "pd_transfer_failed",
                                         "param": None, "code": "pd_transfer_failed"}
    (pd_id,) = [i for d in setup.decodes for i in d.ids("kv_timeout")]
    prefill = next(p for p in setup.prefills if pd_id in p.ids("started"))
    wait_until(lambda: pd_id in prefill.ids("aborted"), what="the prefill to be let go")


@pytest.mark.parametrize("failure", ["503", "hang", "drop"])
def test_pd_retry_asks_another_prefill_instance_into_the_same_reservation(setup, failure):
    # The cache-aware policy sends an unknown prompt to the least used instance: make that the broken one.
    retries_before = metric(setup.retrying, "retries_total")
    broken = setup.prefills[0]
    broken.mode = failure
    body = {"model": MODEL, "prompt": f"retry me {failure}", "max_tokens": 4}
    for attempt in range(4):  # until one request hit the broken instance first
        response = post(setup.retrying, {**body, "prompt": f"{body['prompt']} {attempt}"})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected_text({**body, "prompt": f"{body['prompt']} {attempt}"})
        if broken.log:
            break
    assert broken.log, "the broken prefill instance was never tried"
    if failure != "drop":  # a dropped connection leaves no record of the id on the broken side
        retried = [i for i in setup.prefills[1].ids("done") if i in broken.ids("started")]
        assert retried and setup.prefills[1].destinations[retried[0]] == \
            setup.decode_with(retried[0]).reservations[retried[0]]  # the same reservation
    assert metric(setup.retrying, "retries_total") > retries_before
    broken.mode = "ok"
    wait_until(lambda: all(b["healthy"] for b in setup.retrying.state(AUTH)["backends"]),
               what="the prefill instance to come back")


def test_a_refused_prefill_connection_is_an_error_or_a_retry(setup):
    transfer, decode = setup.transfer, setup.decodes[0]
    dying, live = FakePrefill(transfer, "dying", BACKEND_KEY), setup.prefills[1]
    live_url = setup.retrying.state(AUTH)["backends"][3]["url"]
    with RunningApp(decode.app) as d:
        dead_app = RunningApp(dying.app)
        with dead_app:
            # Health checks far apart: the router learns that the instance is gone only by using it.
            configs = [pd_config((dead_app.url,), (d.url,), health_interval_s=60, policy="round_robin"),
                       pd_config((dead_app.url, live_url), (d.url,), health_interval_s=60, policy="round_robin",
                                 pd_retry=True)]
            routers = [RunningApp(build_router_app(c, setup.tokenizer)) for c in configs]
            for r in routers:
                r.__enter__()
        try:  # the prefill instance is stopped now: connections to it are refused
            body = {"model": MODEL, "prompt": "anyone there", "max_tokens": 2}
            response = post(routers[0], body)
            assert response.status_code == 503
            assert "could not be reached" in response.json()["error"]["message"]
            assert metric(routers[0], "pd_prefill_failures_total", reason="connection") == 1
            response = post(routers[1], body)
            assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected_text(body)
            assert live.ids("done")
            assert metric(routers[1], "retries_total", reason="pd_prefill_connection") == 1
        finally:
            for r in routers:
                r.__exit__(None, None, None)


def test_a_decode_stream_cut_midway_ends_with_an_error_event_and_done(setup):
    for d in setup.decodes:
        d.mode, d.cut_after = "cut", 2
    before = metric(setup.router, "pd_requests_total", outcome="stream_broken")
    response = post(setup.router, {"model": MODEL, "prompt": "cut me", "max_tokens": 6, "stream": True})
    assert response.status_code == 200
    events = sse_events(response.content)
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]]
    assert "".join(texts) == expected_text({"prompt": "cut me", "max_tokens": 6})[:len("".join(texts))]
    error = json.loads(events[2][6:])["error"]
    assert error["type"] == "upstream_error" and "broke off" in error["message"]
    assert events[3:] == [b"data: [DONE]\n\n"]
    wait_until(lambda: metric(setup.router, "pd_requests_total", outcome="stream_broken") == before + 1,
               what="the outcome to be counted")


def test_a_decode_failing_before_output_is_retried_on_another_decode_instance(setup):
    first, second = setup.decodes
    retries_before = metric(setup.router, "retries_total", reason="pd_decode_503")
    first.mode = second.mode = "ok"
    first.kv_usage = 0.0
    second.kv_usage = 0.5  # the router tries the idle one first
    wait_until(lambda: setup.router.state(AUTH)["backends"][1]["load"].get("kv_usage") == 0.5, what="load poll")
    first.mode = "reserve_error"
    body = {"model": MODEL, "prompt": "again", "max_tokens": 3}
    response = post(setup.router, body)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected_text(body)
    assert second.ids("finished") and not first.ids("reserved")
    assert metric(setup.router, "retries_total", reason="pd_decode_503") == retries_before + 1
    # A refusal that is about the request itself (400) is the client's answer, not retried.
    first.reserve_error_status = second.reserve_error_status = 400
    second.mode = "reserve_error"
    response = post(setup.router, body)
    assert response.status_code == 400 and "cannot reserve (400)" in response.json()["error"]["message"]
    # Every decode instance refuses with 503 (one as an event, one as the HTTP status): the client gets it.
    first.reserve_error_status = second.reserve_error_status = 503
    second.mode = "refuse"
    for _ in range(2):
        response = post(setup.router, body)
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
        assert response.json()["error"]["message"] in ("overloaded", "cannot reserve (503)")


def test_a_slow_reservation_is_given_up_and_another_decode_instance_serves(setup):
    slow, fast = setup.decodes
    fast.kv_usage = 0.5
    wait_until(lambda: setup.router.state(AUTH)["backends"][1]["load"].get("kv_usage") == 0.5, what="load poll")
    slow.reserve_delay_s = TIMEOUT_S + 1
    body = {"model": MODEL, "prompt": "patience", "max_tokens": 2, "stream": True}
    response = post(setup.router, body)
    assert response.status_code == 200 and fast.ids("finished")
    wait_until(lambda: slow.ids("aborted"), what="the slow decode instance to see the request closed")
    assert not slow.ids("reserved")
    assert metric(setup.router, "pd_decode_failures_total", reason="reserve_timeout") >= 1


def raw_request(router, body) -> socket.socket:
    """Sends a request on a bare socket (to leave before any response byte arrived)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", router.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("when", ["during_prefill", "during_decode"])
def test_a_client_disconnect_closes_both_upstream_connections(setup, when):
    before = metric(setup.router, "pd_requests_total", outcome="client_disconnected")
    timeouts = metric(setup.router, "pd_prefill_failures_total", reason="timeout")
    body = {"model": MODEL, "prompt": f"leaving {when}", "max_tokens": 50, "stream": True}
    if when == "during_prefill":
        for p in setup.prefills:
            p.mode = "hang"
        sock = raw_request(setup.router, body)
        wait_until(lambda: any(p.ids("started") for p in setup.prefills), what="the prefill to start")
        sock.close()
    else:
        for d in setup.decodes:
            d.token_delay_s = 0.5
        with httpx.stream("POST", setup.router.url + "/v1/completions", json=body, headers=AUTH,
                          timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_bytes())  # the first token arrived
    (pd_id,) = [i for d in setup.decodes for i in d.ids("reserved")]
    decode = setup.decode_with(pd_id)
    wait_until(lambda: pd_id in decode.ids("aborted"), what="decode to abort")
    if when == "during_prefill":
        prefill = next(p for p in setup.prefills if pd_id in p.ids("started"))
        wait_until(lambda: pd_id in prefill.ids("aborted"), what="prefill to abort")
    wait_until(lambda: metric(setup.router, "backend_in_flight") == 0, what="the router's accounting to settle")
    wait_until(lambda: metric(setup.router, "pd_requests_total", outcome="client_disconnected") == before + 1,
               what="the disconnect to be counted")
    assert metric(setup.router, "pd_prefill_failures_total", reason="timeout") == timeouts  # closed, not timed out


def test_the_least_loaded_decode_instance_takes_the_request(setup):
    busy, idle = setup.decodes
    busy.kv_usage, idle.kv_usage = 0.8, 0.1
    wait_until(lambda: [b["load"].get("kv_usage") for b in setup.router.state(AUTH)["backends"][:2]] == [0.8, 0.1],
               what="load poll")
    for i in range(3):
        assert post(setup.router, {"model": MODEL, "prompt": f"where {i}", "max_tokens": 2}).status_code == 200
    assert len(idle.ids("finished")) == 3 and not busy.log


def test_requests_sharing_a_long_prefix_go_to_the_same_prefill_instance(setup):
    def prompt(group: str, i: int) -> str:
        shared = " ".join(f"{group}{k}" for k in range(120))  # a few hundred tokens: many full blocks
        return f"{shared} question {i}"

    # A router of its own: no earlier test's requests in its counts (they break ties between instances).
    urls = {role: tuple(b["url"] for b in setup.router.state(AUTH)["backends"] if b["role"] == role)
            for role in ("prefill", "decode")}
    with RunningApp(build_router_app(pd_config(**urls), setup.tokenizer)) as router:
        wait_until(lambda: all(b["kv_cursor"] is not None for b in router.state(AUTH)["backends"]),
                   what="the KV subscriptions")
        where = {}
        for group in ("alpha", "bravo"):
            for i in range(3):
                response = post(router, {"model": MODEL, "prompt": prompt(group, i), "max_tokens": 2})
                assert response.status_code == 200
                pd_id = response.json()["id"]  # the fake decode names its reply by the pd_request_id
                where.setdefault(group, set()).update(p.name for p in setup.prefills if pd_id in p.ids("done"))
        assert len(where["alpha"]) == 1 and len(where["bravo"]) == 1
        assert where["alpha"] != where["bravo"]  # different prefixes spread over the pool
        assert metric(router, "expected_hit_tokens_total") > 0


def test_health_and_state_cover_both_pools(setup):
    state = setup.router.state(AUTH)
    assert [b["role"] for b in state["backends"]] == ["decode", "decode", "prefill", "prefill"]
    setup.decodes[0].healthy = setup.decodes[1].healthy = False
    wait_until(lambda: httpx.get(setup.router.url + "/health").status_code == 503, what="/health to fail")
    response = post(setup.router, {"model": MODEL, "prompt": "nobody", "max_tokens": 2})
    assert response.status_code == 503 and "no decode instance" in response.json()["error"]["message"]
    setup.decodes[0].healthy = setup.decodes[1].healthy = True
    wait_until(lambda: httpx.get(setup.router.url + "/health").status_code == 200, what="the pool to come back")
    assert post(setup.router, {"model": MODEL, "prompt": "back", "max_tokens": 2}).status_code == 200


def test_options_refuse_mixed_or_incomplete_pools():
    with pytest.raises(ValueError, match="not both"):
        RouterConfig(backends=("http://a:1",), prefill=("http://b:1",), decode=("http://c:1",))
    with pytest.raises(ValueError, match="decode: prefill-decode routing needs"):
        RouterConfig(prefill=("http://b:1",))
    with pytest.raises(ValueError, match="one role"):
        RouterConfig(prefill=("http://b:1",), decode=("http://b:1",))
    with pytest.raises(ValueError, match="pd_prefill_timeout_s"):
        RouterConfig(prefill=("http://b:1",), decode=("http://c:1",), pd_prefill_timeout_s=0)
    with pytest.raises(ValueError, match="long_lane"):
        RouterConfig(prefill=("http://b:1",), decode=("http://c:1",), long_lane=("http://c:1",))
    assert RouterConfig(prefill=("http://b:1/",), decode=("http://c:1",)).prefill == ("http://b:1",)


def test_rtpllm_bench_serve_runs_against_the_pd_router(setup, tmp_path, monkeypatch):
    from rtpllm.serving.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the router wants its key; bench serve sends this one
    for d in setup.decodes:
        d.token_delay_s = 0.01  # tokens apart in time: each its own chunk, relayed as it comes
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", setup.router.url, "--tokenizer", checkpoint_path("llama3"),
                 "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "5",
                 "--num-prompts", "6", "--request-rate", "50", "--ignore-eos", "--output-json", str(out),
                 "--disable-tqdm"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0 and result["model"] == MODEL
    assert result["total_output_tokens"] == 30  # the fake's usage: exactly max_tokens each
    assert result["ttft_ms"]["median"] > 0 and result["itl_ms"]["median"] >= 5


def test_the_event_splitter_keeps_partial_events_for_the_next_read():
    from rtpllm.router.sse import EventSplitter, event_json, is_done

    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}\n\n']
    assert splitter.feed(b': 2}\r\n\r\n: ping\n\ndata: [DONE]\n\n') == [b'data: {"b": 2}\n\n', b": ping\n\n",
                                                                         b"data: [DONE]\n\n"]
    assert splitter.pending == b""
    assert event_json(b'data: {"b": 2}\n\n') == {"b": 2} and event_json(b": ping\n\n") is None
    assert is_done(b"data: [DONE]\n\n") and not is_done(b'data: {"b": 2}\n\n')


def test_pd_retry_starts_over_when_the_reservation_is_lost(setup):
    # A prefill instance that never writes: decode gives the reservation up (its error event);
    # with --pd-retry the request starts over with a new reservation and the other prefill.
    hung = setup.prefills[0]
    hung.mode = "hang"
    for d in setup.decodes:
        d.kv_timeout_s = 0.3
    body = {"model": MODEL, "prompt": "lost and found", "max_tokens": 4}
    try:
        for attempt in range(4):  # until one request met the hung instance first
            request = {**body, "prompt": f"{body['prompt']} {attempt}"}
            response = post(setup.retrying, request)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected_text(request)
            if hung.ids("started"):
                break
    finally:
        for d in setup.decodes:
            d.kv_timeout_s = 5.0
    (lost,) = hung.ids("started")
    assert any(lost in d.ids("kv_timeout") for d in setup.decodes)
    assert metric(setup.retrying, "retries_total", reason="pd_reservation_lost") >= 1
    wait_until(lambda: lost in hung.ids("aborted"), what="the hung prefill to be let go")
    # Without --pd-retry the client gets decode's error (test_decodes_own_error_before_output...).
