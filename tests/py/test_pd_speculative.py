"""Speculative decoding on a decode instance of a prefill-decode pair: the prompt's KV comes from
prefill, the draft model catches its own KV up over the prompt on its first proposal, and the
output is token-exact against a colocated instance without speculation, with the decode instance
at TP=1 and at TP=2 (the draft runs on rank 0; every rank verifies). The draft is the target
itself, so a draft whose KV missed the prompt would show as rejected drafts."""

import json

import httpx
import pytest

from checkpoints import checkpoint_path
from pd_driver import Instance, PDRun

pytestmark = pytest.mark.skipif(not __import__("rtpllm._C")._C.has_ucx, reason="rtpllm._C built without UCX")

SPEC = {"method": "draft_model", "model": checkpoint_path("llama3"), "num_speculative_tokens": 3, "adaptive": False}


@pytest.fixture(scope="module")
def instances():
    started = [Instance("--block-size", "16", "--no-engine-process", "--kv-host-cache-gib", "0"),
               Instance("--role", "prefill", "--block-size", "16", "--kv-host-cache-gib", "0"),
               Instance("--role", "decode", "--block-size", "8", "--pd-timeout-s", "10", "--kv-host-cache-gib", "0",
                        "--speculative-config", json.dumps(SPEC)),
               Instance("--role", "decode", "--block-size", "8", "--pd-timeout-s", "10", "--kv-host-cache-gib", "0",
                        "--speculative-config", json.dumps(SPEC), "--tensor-parallel-size", "2")]
    try:
        yield [i.wait_ready() for i in started]
    finally:
        for i in started:
            i.stop()


@pytest.mark.parametrize("decode_tp", [1, 2])
@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"prompt": "The quick brown fox jumps over the lazy dog, and then the", "max_tokens": 16}),
    ("chat", {"messages": [{"role": "user", "content": "Tell me about foxes and dogs."}], "max_tokens": 16}),
])
def test_speculating_decode_is_token_exact_and_its_drafts_are_accepted(instances, endpoint, body, decode_tp):
    colocated, prefill, decode = instances[0], instances[1], instances[1 + decode_tp]
    body = {**body, "temperature": 0}
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    expected = httpx.post(colocated.url + path, json=body, timeout=60).json()
    choice = expected["choices"][0]
    expected_text = choice["text"] if "text" in choice else choice["message"]["content"]
    drafts_before = decode.metric("rtpllm:spec_decode_num_draft_tokens_total")
    accepted_before = decode.metric("rtpllm:spec_decode_num_accepted_tokens_total")
    run = PDRun(prefill, decode, endpoint, {**body, "stream": True}, f"spec-{endpoint}-tp{decode_tp}").run()
    assert run.reservation_error is None, run.reservation_error
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text() == expected_text
    drafts = decode.metric("rtpllm:spec_decode_num_draft_tokens_total") - drafts_before
    accepted = decode.metric("rtpllm:spec_decode_num_accepted_tokens_total") - accepted_before
    assert drafts >= 3  # the decode steps speculated
    assert accepted >= 0.8 * drafts, (accepted, drafts)  # the draft (the target itself) saw the whole prompt
