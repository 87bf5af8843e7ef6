"""Prefill-decode disaggregation between two `rtpllm serve` processes (prefill block size 16 and
chunked prefill, decode 8), driven as `rtpllm router` drives them (pd_driver.py): the output is token-exact against one
colocated instance, for completions and chat, streamed and not, with the reservation before the
prefill or overlapped with it (the destination following, early or late); a decode prefix hit is
honoured; bad input is refused with 4xx and breaks nothing; a reservation without room waits for
it; a destination that never comes ends both sides within their timeouts."""

import threading
import time

import httpx
import pytest

from pd_driver import Instance, PDRun, sse_events

pytestmark = pytest.mark.skipif(not __import__("rtpllm._C")._C.has_ucx, reason="rtpllm._C built without UCX")

PROMPT = "The quick brown fox jumps over the lazy dog, and then the"
CHAT = [{"role": "user", "content": "Tell me about foxes and dogs."}]


@pytest.fixture(scope="module")
def instances():
    # The colocated reference steps its engine in a thread; prefill and decode in engine processes.
    # Prompts are longer than one step's budget: prefill computes them in chunks (as the reference).
    chunked = ("--max-num-batched-tokens", "24")
    started = [Instance("--block-size", "16", "--no-engine-process", "--kv-host-cache-gib", "0", *chunked),
               Instance("--role", "prefill", "--block-size", "16", "--kv-host-cache-gib", "0", "--pd-timeout-s", "6",
                        *chunked),
               Instance("--role", "decode", "--block-size", "8", "--pd-timeout-s", "10", "--kv-host-cache-gib", "0")]
    try:
        yield [i.wait_ready() for i in started]
    finally:
        for i in started:
            i.stop()


def _reference(url: str, endpoint: str, body: dict) -> dict:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    return httpx.post(url + path, json={**body, "stream": False}, timeout=60).json()


def _reference_text(reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}),
    ("chat", {"messages": CHAT, "max_tokens": 12, "temperature": 0}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 1234}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_output_is_token_exact_against_colocated(instances, endpoint, body, stream):
    colocated, prefill, decode = instances
    expected = _reference(colocated.url, endpoint, body)
    run = PDRun(prefill, decode, endpoint, {**body, "stream": stream}, f"exact-{endpoint}-{stream}-{body.get('seed')}").run()
    assert run.reservation_error is None, run.reservation_error
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    result = run.prefill_response.json()
    assert result["prompt_tokens"] == expected["usage"]["prompt_tokens"] == run.destination["num_prompt_tokens"]
    assert result["transferred_bytes"] > 0
    # Its timeline: the last chunk launched, then the last layer's write (with the first token).
    assert 0 < result["prefill_s"] <= result["last_write_s"] and result["transfer_s"] > 0
    assert run.destination["block_size"] == 8
    assert run.text() == _reference_text(expected)
    if not stream:
        (reply,) = run.events
        assert reply["usage"] == expected["usage"]
        assert reply["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    else:
        assert any(c.get("finish_reason") for e in run.events for c in e.get("choices", []))


def test_decode_prefix_hit_is_honoured_and_pool_returns_to_idle(instances):
    colocated, prefill, decode = instances
    body = {"prompt": "Once upon a time, in a land of rivers and hills, " * 3, "max_tokens": 6, "temperature": 0}
    expected = _reference_text(_reference(colocated.url, "completions", body))
    first = PDRun(prefill, decode, "completions", body, "prefix-1").run()
    second = PDRun(prefill, decode, "completions", body, "prefix-2").run()
    assert first.text() == second.text() == expected
    assert first.destination["num_cached_tokens"] == 0
    assert second.destination["num_cached_tokens"] >= 16  # decode kept the prompt's full blocks
    # Only the tokens past decode's hit (aligned to both block sizes) were written the second time.
    assert second.prefill_response.json()["transferred_bytes"] < first.prefill_response.json()["transferred_bytes"]
    assert decode.metric("rtpllm:pd_requests_total", role="decode", outcome="completed") >= 2
    assert prefill.metric("rtpllm:pd_requests_total", role="prefill", outcome="completed") >= 2
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:kv_cache_usage_perc") == 0.0
        assert instance.metric("rtpllm:num_requests_running") == 0


def test_bad_input_is_refused_with_4xx_and_breaks_nothing(instances):
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    run = PDRun(prefill, decode, "completions", body, "good-after-bad")
    with httpx.Client(timeout=60) as client:
        decode_body = {"pd_request_id": "bad-1", "endpoint": "completions", "request": body}
        # Wrong role, both ways.
        reply = client.post(colocated.url + "/internal/pd/prefill", json={**decode_body, "destination": {}})
        assert reply.status_code == 400
        reply = client.post(prefill.url + "/internal/pd/decode", json=decode_body)
        assert reply.status_code == 400 and "role" in reply.text
        # Malformed bodies.
        assert client.post(decode.url + "/internal/pd/decode", json={"endpoint": "chat"}).status_code == 400
        assert client.post(decode.url + "/internal/pd/decode",
                           json={**decode_body, "request": {"prompt": PROMPT, "n": 0}}).status_code == 400
        with client.stream("POST", decode.url + "/internal/pd/decode", json=decode_body) as stream:
            destination = __import__("json").loads(next(stream.iter_lines())[len("data: "):])["pd_reserved"]
            bad = {**decode_body, "destination": {**destination, "cache_identity": "0123456789abcdef"}}
            reply = client.post(prefill.url + "/internal/pd/prefill", json=bad)
            assert reply.status_code == 400 and "cache_identity" in reply.text
            bad = {**decode_body, "destination": {**destination, "blocks": destination["blocks"] * 1000}}
            reply = client.post(prefill.url + "/internal/pd/prefill", json=bad)
            assert reply.status_code == 400 and "blocks" in reply.text
            far = list(range(10**6, 10**6 + len(destination["blocks"])))
            bad = {**decode_body, "destination": {**destination, "blocks": far}}
            reply = client.post(prefill.url + "/internal/pd/prefill", json=bad)
            assert reply.status_code == 400 and "out of range" in reply.text
            if len(destination["blocks"]) > 1:
                twice = [destination["blocks"][0]] * len(destination["blocks"])
                reply = client.post(prefill.url + "/internal/pd/prefill",
                                    json={**decode_body, "destination": {**destination, "blocks": twice}})
                assert reply.status_code == 400 and "twice" in reply.text
            bad = {**decode_body, "destination": {**destination, "pd_request_id": "someone-else"}}
            reply = client.post(prefill.url + "/internal/pd/prefill", json=bad)
            assert reply.status_code == 400 and "pd_request_id" in reply.text
            bad = {**decode_body, "request": {**body, "prompt": PROMPT + " longer"}, "destination": destination}
            reply = client.post(prefill.url + "/internal/pd/prefill", json=bad)
            assert reply.status_code == 400 and "num_prompt_tokens" in reply.text
        # The stream closed: the reservation is aborted (counted). Everything still works.
    run.run()
    assert decode.metric("rtpllm:pd_requests_total", role="decode", outcome="aborted") >= 1
    assert run.reservation_error is None, run.reservation_error
    assert run.prefill_response.status_code == 200
    assert run.text() == _reference_text(_reference(colocated.url, "completions", body))


def test_a_hostile_router_cannot_write_into_another_requests_blocks(instances):
    """Block lists in range but not the request's (another reservation's, or a finished request's
    stale ones) are refused by the decode instance's write grants before a byte moves: a 400 from
    the prefill, and the victim request's output is untouched."""
    colocated, prefill, decode = instances
    body = {"prompt": "Grants keep every prefill inside its own reservation, even when", "max_tokens": 6,
            "temperature": 0}
    expected = _reference_text(_reference(colocated.url, "completions", body))
    with httpx.Client(timeout=60) as client:
        victim_body = {"pd_request_id": "victim-grant", "endpoint": "completions", "request": body}
        rogue_body = {"pd_request_id": "rogue-grant", "endpoint": "completions", "request": body}
        with client.stream("POST", decode.url + "/internal/pd/decode", json=victim_body) as victim, \
                client.stream("POST", decode.url + "/internal/pd/decode", json=rogue_body) as rogue:
            victim_events = sse_events(victim)
            victim_destination = next(victim_events)["pd_reserved"]
            rogue_events = sse_events(rogue)  # kept: a dropped generator closes the stream (an abort)
            rogue_destination = next(rogue_events)["pd_reserved"]
            assert set(victim_destination["blocks"]) - set(rogue_destination["blocks"])
            # The rogue request's prefill aimed at the victim's blocks.
            aimed = {**rogue_destination, "blocks": victim_destination["blocks"]}
            reply = client.post(prefill.url + "/internal/pd/prefill", json={**rogue_body, "destination": aimed})
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "destination" and "outside the write grant" in reply.text
            # The victim is written by its own prefill and decodes what a colocated instance does.
            reply = client.post(prefill.url + "/internal/pd/prefill", json={**victim_body,
                                                                               "destination": victim_destination})
            assert reply.status_code == 200, reply.text
            text = "".join(e["choices"][0]["text"] for e in victim_events if e.get("choices"))
        assert text == expected
        # Replayed after the request ended: its grant was revoked, nothing is written (409: the
        # reservation is gone).
        reply = client.post(prefill.url + "/internal/pd/prefill", json={**victim_body,
                                                                           "destination": victim_destination})
        assert reply.status_code == 409 and "no write grant" in reply.text, reply.text
    assert prefill.metric("rtpllm:pd_requests_total", role="prefill", outcome="failed") >= 2
    deadline = time.monotonic() + 30
    while prefill.metric("rtpllm:kv_cache_usage_perc") != 0.0:
        assert time.monotonic() < deadline, "the prefill's blocks were not freed"
        time.sleep(0.2)


def test_reservation_without_room_queues_until_blocks_free_up(instances):
    colocated, prefill, decode = instances  # decode: 64 blocks of 8 tokens
    big = {"prompt": [(7 * i) % 500 + 3 for i in range(390)], "max_tokens": 3, "temperature": 0}  # 49 blocks
    small = {"prompt": [(11 * i) % 500 + 5 for i in range(150)], "max_tokens": 3, "temperature": 0}  # 19 blocks
    with httpx.Client(timeout=60) as client:
        first_body = {"pd_request_id": "room-1", "endpoint": "completions", "request": big}
        with client.stream("POST", decode.url + "/internal/pd/decode", json=first_body) as first:
            first_events = sse_events(first)
            first_destination = next(first_events)["pd_reserved"]
            second = PDRun(prefill, decode, "completions", small, "room-2")
            thread = threading.Thread(target=second.run, daemon=True)
            thread.start()
            time.sleep(1.0)
            assert second.destination is None  # queued: no room for its 19 blocks yet
            reply = client.post(prefill.url + "/internal/pd/prefill", json={**first_body,
                                                                              "destination": first_destination})
            assert reply.status_code == 200, reply.text
            rest = list(first_events)
    assert rest and "error" not in rest[-1]
    thread.join(60)
    assert second.prefill_response is not None and second.prefill_response.status_code == 200
    assert second.text() == _reference_text(_reference(colocated.url, "completions", small))


@pytest.mark.parametrize("delay_s", [0.0, 1.5])  # 1.5 s: the prompt was computed long before
def test_overlapped_prefill_is_token_exact_whenever_the_destination_comes(instances, delay_s):
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT * 3, "max_tokens": 8, "temperature": 0}  # chunked: several prefill steps
    expected = _reference(colocated.url, "completions", body)
    run = PDRun(prefill, decode, "completions", {**body, "stream": True}, f"overlap-{delay_s}").run(
        overlap=True, destination_delay_s=delay_s)
    assert run.reservation_error is None, run.reservation_error
    assert run.destination_response.status_code == 200, run.destination_response.text
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    result = run.prefill_response.json()
    assert result["prompt_tokens"] == expected["usage"]["prompt_tokens"] and result["transferred_bytes"] > 0
    assert run.text() == _reference_text(expected)


def test_a_destination_that_overtakes_its_prefill_request_waits_for_it(instances):
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    decode_body = {"pd_request_id": "overtaken", "endpoint": "completions", "request": body}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", decode.url + "/internal/pd/decode", json=decode_body) as stream:
            events = sse_events(stream)
            destination = next(events)["pd_reserved"]
            reply = client.post(prefill.url + "/internal/pd/prefill/destination",
                                json={"pd_request_id": "overtaken", "destination": destination})
            assert reply.status_code == 200, reply.text
            reply = client.post(prefill.url + "/internal/pd/prefill", json=decode_body)  # no destination
            assert reply.status_code == 200, reply.text
            text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert text == _reference_text(_reference(colocated.url, "completions", body))


def test_overlapped_prefill_with_a_bad_or_missing_destination_ends_cleanly(instances):
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with httpx.Client(timeout=60) as client:
        # A destination for a prefill that is not here (yet) waits for it; a malformed one is a 400.
        reply = client.post(prefill.url + "/internal/pd/prefill/destination", json={"pd_request_id": "x"})
        assert reply.status_code == 400 and "destination" in reply.text
        reply = client.post(colocated.url + "/internal/pd/prefill/destination", json={"pd_request_id": "x"})
        assert reply.status_code == 400
    # No destination ever: decode's wait for the KV and the prefill both time out; blocks come back.
    bad = PDRun(prefill, decode, "completions", body, "overlap-bad")
    bad.run(overlap=True, destination_delay_s=None)  # decode's wait for the KV ends after 10 s
    assert bad.events and "error" in bad.events[0]
    assert bad.prefill_response.status_code == 504 and "no destination" in bad.prefill_response.text
    assert decode.metric("rtpllm:pd_requests_total", role="decode", outcome="timed_out") >= 1
    for instance in (prefill, decode):
        deadline = time.monotonic() + 30
        while instance.metric("rtpllm:kv_cache_usage_perc") != 0.0:
            assert time.monotonic() < deadline, "blocks were not freed"
            time.sleep(0.2)
    # Another model's reservation: the destination call and the prefill both answer 400.
    with httpx.Client(timeout=60) as client:
        thread = threading.Thread(target=lambda: setattr(bad, "prefill_response", client.post(
            prefill.url + "/internal/pd/prefill",
            json={"pd_request_id": "overlap-identity", "endpoint": "completions", "request": body})))
        thread.start()
        with client.stream("POST", decode.url + "/internal/pd/decode",
                           json={"pd_request_id": "overlap-identity", "endpoint": "completions",
                                 "request": body}) as stream:
            destination = next(sse_events(stream))["pd_reserved"]
            reply = client.post(prefill.url + "/internal/pd/prefill/destination",
                                json={"pd_request_id": "overlap-identity",
                                      "destination": {**destination, "cache_identity": "0123456789abcdef"}})
            assert reply.status_code == 400 and "cache_identity" in reply.text
            thread.join(30)
        assert bad.prefill_response.status_code == 400 and "cache_identity" in bad.prefill_response.text
    # Everything still works.
    run = PDRun(prefill, decode, "completions", body, "overlap-after-bad").run(overlap=True)
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text() == _reference_text(_reference(colocated.url, "completions", body))
