"""Prefill-decode disaggregation with tensor parallelism on the CPU (gloo): prefill and decode
instances at TP=2 (every rank moves its own KV heads: rank 1 over its own transfer engine, told by
rank 0), overlapped as the router does it and not, and across different TP sizes (TP=2 prefill into
a TP=1 decode: two ranks fill the halves of each token's heads; TP=1 prefill into a TP=2 decode:
one rank's heads split over two), each with the destination known before the prompt runs (every
rank writes layer by layer) and coming after it was computed (every layer at once). The output is
token-exact against a colocated instance at TP=1 (float32: TP=2's greedy tokens equal TP=1's), and
the pools end idle.
"""

import httpx
import pytest

from pd_driver import Instance, PDRun

pytestmark = pytest.mark.skipif(not __import__("rtpllm._C")._C.has_ucx, reason="rtpllm._C built without UCX")

PROMPT = "Tensor parallel prefill and decode, each rank moving its own heads of the KV cache, " * 2
TP2 = ("--tensor-parallel-size", "2", "--kv-host-cache-gib", "0")


@pytest.fixture(scope="module")
def instances():
    started = [Instance("--block-size", "16", "--no-engine-process", "--kv-host-cache-gib", "0"),
               Instance("--role", "prefill", "--block-size", "16", "--pd-timeout-s", "10", *TP2),
               Instance("--role", "decode", "--block-size", "8", "--pd-timeout-s", "10", *TP2),
               Instance("--role", "decode", "--block-size", "8", "--pd-timeout-s", "10", "--kv-host-cache-gib", "0"),
               Instance("--role", "prefill", "--block-size", "16", "--pd-timeout-s", "10", "--kv-host-cache-gib", "0")]
    try:
        yield [i.wait_ready(180) for i in started]
    finally:
        for i in started:
            i.stop()


def _expected(colocated: Instance, body: dict) -> str:
    return httpx.post(colocated.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


@pytest.mark.parametrize("overlap", [False, True])
def test_tp2_prefill_into_tp2_decode_is_token_exact(instances, overlap):
    colocated, prefill, decode, _, _ = instances
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    run = PDRun(prefill, decode, "completions", {**body, "stream": True}, f"tp2-{overlap}").run(overlap=overlap)
    assert run.reservation_error is None, run.reservation_error
    assert len(run.destination["transfer_endpoints"]) == 1  # decode's rank 1
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text() == _expected(colocated, body)
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:pd_requests_total", outcome="completed") >= 1


# reserved-first: the destination is known before the prompt runs, so every rank writes layer by
# layer; late: it comes 1.5 s after the prefill request, when the prompt is computed, so the ranks
# without notices write every layer at once.
@pytest.mark.parametrize("pair", ["tp2-into-tp1", "tp1-into-tp2", "tp2-into-tp2"])
@pytest.mark.parametrize("mode", ["reserved-first", "late"])
def test_tp_sizes_move_head_slices_token_exact(instances, pair, mode):
    colocated, prefill_tp2, decode_tp2, decode_tp1, prefill_tp1 = instances
    prefill, decode = {"tp2-into-tp1": (prefill_tp2, decode_tp1), "tp1-into-tp2": (prefill_tp1, decode_tp2),
                       "tp2-into-tp2": (prefill_tp2, decode_tp2)}[pair]
    body = {"prompt": PROMPT + pair, "max_tokens": 8, "temperature": 0}
    late = mode == "late"
    run = PDRun(prefill, decode, "completions", {**body, "stream": True}, f"{pair}-{mode}").run(
        overlap=late, destination_delay_s=1.5 if late else 0.0)
    assert run.reservation_error is None, run.reservation_error
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text() == _expected(colocated, body)
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:kv_cache_usage_perc") == 0.0


def test_a_rank_whose_write_fails_fails_the_prefill_and_frees_its_blocks(instances):
    """Rank 1 of the prefill cannot reach its decode rank (the destination names a closed port):
    its answer fails the request (503) before the first token goes out, decode's request ends with
    an error, and the prefill holds no block."""
    import json
    import socket

    colocated, prefill, decode, _, _ = instances
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    decode_body = {"pd_request_id": "tp-rank-fails", "endpoint": "completions", "request": body}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", decode.url + "/internal/pd/decode", json=decode_body) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            destination = json.loads(next(lines)[len("data: "):])["pd_reserved"]
            forged = {**destination, "transfer_endpoints": [["127.0.0.1", closed_port]]}
            reply = client.post(prefill.url + "/internal/pd/prefill", json={**decode_body, "destination": forged})
            assert reply.status_code == 503 and "rank 1" in reply.text, reply.text
            rest = [json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]"]
    assert rest and "error" in rest[-1]  # decode's wait for the KV ended with an error, not a silent recompute
    assert prefill.metric("rtpllm:pd_requests_total", role="prefill", outcome="failed") >= 1
    # (decode keeps the reservation's blocks for 3 x pd_timeout_s: it cannot know rank 0's writes are final)
    assert prefill.metric("rtpllm:kv_cache_usage_perc") == 0.0
