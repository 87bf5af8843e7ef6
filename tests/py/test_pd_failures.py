"""The PD failure policy (protocol.py) between `rtpllm serve` processes: a decode instance killed
while the prefill writes makes the prefill answer an error and free its blocks; a prefill killed
mid-transfer makes the decode end the request with an error event within pd_timeout_s and free
its blocks; each outcome is counted on /metrics, and the survivor serves the next request.

The prefill instance stalls between layers (RTPLLM_PD_TEST_STALL_S), so that a kill lands in the
middle of a transfer."""

import threading
import time

import httpx
import pytest

from pd_driver import Instance, PDRun, free_port, sse_events

pytestmark = pytest.mark.skipif(not __import__("rtpllm._C")._C.has_ucx, reason="rtpllm._C built without UCX")

STALL_S = 1.0
TIMEOUT_S = 3.0
BODY = {"prompt": "Prefill and decode live in different processes, and one of them", "max_tokens": 5,
        "temperature": 0}


@pytest.fixture(scope="module")
def instances():
    started = [Instance("--role", "prefill", "--block-size", "16", "--pd-timeout-s", str(TIMEOUT_S),
                        "--kv-host-cache-gib", "0", env={"RTPLLM_PD_TEST_STALL_S": str(STALL_S)}),
               Instance("--role", "decode", "--block-size", "16", "--pd-timeout-s", str(TIMEOUT_S),
                        "--kv-host-cache-gib", "0"),
               Instance("--role", "decode", "--block-size", "8", "--pd-timeout-s", str(TIMEOUT_S),
                        "--kv-host-cache-gib", "0", "--no-engine-process")]
    try:
        yield [i.wait_ready() for i in started]
    finally:
        for i in started:
            i.stop()


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _in_thread(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_unreachable_decode_transfer_engine_is_a_503_and_frees_everything(instances):
    prefill, decode, _ = instances
    decode_body = {"pd_request_id": "nowhere-1", "endpoint": "completions", "request": BODY}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", decode.url + "/internal/pd/decode", json=decode_body) as stream:
            destination = next(sse_events(stream))["pd_reserved"]
            reply = client.post(prefill.url + "/internal/pd/prefill",
                                json={**decode_body, "destination": {**destination, "transfer_port": free_port()}})
    assert reply.status_code == 503, reply.text
    assert "cannot reach" in reply.json()["error"]["message"]
    _wait_until(lambda: prefill.metric("rtpllm:kv_cache_usage_perc") == 0.0, 10, "the prefill's blocks to be freed")
    assert prefill.metric("rtpllm:num_requests_running") == 0


def test_decode_killed_mid_transfer_fails_the_prefill_which_frees_its_blocks(instances):
    prefill, decode, victim = instances
    decode_body = {"pd_request_id": "victim-1", "endpoint": "completions", "request": BODY}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", victim.url + "/internal/pd/decode", json=decode_body) as stream:
            destination = next(sse_events(stream))["pd_reserved"]
            thread, result = _in_thread(lambda: httpx.post(prefill.url + "/internal/pd/prefill", timeout=60,
                                                           json={**decode_body, "destination": destination}))
            time.sleep(STALL_S / 2)  # the prefill is connected and computing its first layer
            victim.kill()
    started = time.monotonic()
    thread.join(3 * TIMEOUT_S + 5)
    assert not thread.is_alive(), "the prefill never answered"
    reply = result["value"]
    assert reply.status_code in (503, 504), reply.text
    assert reply.json()["error"]["type"] == "pd_transfer_failed"
    assert time.monotonic() - started < 2 * TIMEOUT_S + 2
    _wait_until(lambda: prefill.metric("rtpllm:pd_requests_total", role="prefill", outcome="failed") >= 1, 10,
                "the prefill's failure on /metrics")
    _wait_until(lambda: prefill.metric("rtpllm:kv_cache_usage_perc") == 0.0, 10, "the prefill's blocks to be freed")
    # The prefill serves the next request (to a live decode instance).
    run = PDRun(prefill, decode, "completions", BODY, "after-victim").run()
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text()


def test_prefill_killed_mid_transfer_ends_the_decode_request_with_an_error(instances):
    prefill, decode, _ = instances
    # n=2: the second sample waits on the first's KV, and fails with it.
    decode_body = {"pd_request_id": "orphan-1", "endpoint": "completions", "request": {**BODY, "stream": True, "n": 2}}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", decode.url + "/internal/pd/decode", json=decode_body) as stream:
            events = sse_events(stream)
            destination = next(events)["pd_reserved"]
            _in_thread(lambda: httpx.post(prefill.url + "/internal/pd/prefill", timeout=60,
                                          json={**decode_body, "destination": destination}))
            time.sleep(STALL_S * 1.6)  # layer 0 written, layer 1 under way
            prefill.kill()
            killed = time.monotonic()
            rest = list(events)
    assert time.monotonic() - killed < TIMEOUT_S + 2
    assert rest and "error" in rest[-1], rest
    assert rest[-1]["error"]["type"] == "pd_transfer_failed"
    failed = sum(decode.metric("rtpllm:pd_requests_total", role="decode", outcome=o) for o in ("peer_failed", "timed_out"))
    assert failed >= 1
    # The decode instance serves the next request, and its blocks come back once no write can land.
    reply = httpx.post(decode.url + "/v1/completions", json=BODY, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
    _wait_until(lambda: decode.metric("rtpllm:kv_cache_usage_perc") == 0.0, 3 * TIMEOUT_S + 5,
                "the decode's blocks to be freed")
    assert decode.metric("rtpllm:num_requests_running") == 0
    assert httpx.get(decode.url + "/health").status_code == 200
