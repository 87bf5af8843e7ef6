"""Prefill-decode disaggregation on one GPU: prefill and decode as two `rtpllm serve` processes,
each with part of the card's memory, the KV moving over UCX (CUDA IPC between the two processes),
prefill block size 32, decode 16. The output is token-exact against a colocated instance, streamed
and not, with logprobs and n = 2 too, and from a decode instance that speculates with a draft
model; both pools are idle afterwards.

    python -m pytest -q tests/gpu/test_pd_gpu.py
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from checkpoints import checkpoint_path  # noqa: E402
from pd_driver import PD_GPU_TRIO, Instance, PDRun, started_one_at_a_time  # noqa: E402

pytestmark = pytest.mark.skipif(not getattr(__import__("rtpllm._C")._C, "has_ucx", False),
                                reason="rtpllm._C built without UCX (pip install libucx-cu13, then rebuild)")

PROMPT = "Prefill and decode run in two processes on one GPU, and the KV cache moves between them " * 8
MEMORY = ("--gpu-memory-utilization", "0.25")
MODEL = checkpoint_path("gqa9x3")  # head_dim 64: the CUDA attention kernels take 64 or 128


@pytest.fixture(scope="module")
def instances():
    common = ("--device", "cuda", "--kv-host-cache-gib", "0", *MEMORY)
    with started_one_at_a_time(PD_GPU_TRIO, *common, model=MODEL, tcp=False) as started:
        yield started


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"prompt": PROMPT, "max_tokens": 32, "temperature": 0}),
    ("chat", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32, "temperature": 0}),
])
def test_pd_on_one_gpu_is_token_exact_against_colocated(instances, endpoint, body, stream):
    colocated, prefill, decode = instances
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    expected = httpx.post(colocated.url + path, json=body, timeout=120).json()["choices"][0]
    expected = expected["text"] if "text" in expected else expected["message"]["content"]
    run = PDRun(prefill, decode, endpoint, {**body, "stream": stream}, f"gpu-{endpoint}-{stream}").run(120)
    assert run.reservation_error is None, run.reservation_error
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.prefill_response.json()["transferred_bytes"] > 0
    assert run.text() == expected
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:pd_requests_total", outcome="completed") >= 1
        assert instance.metric("rtpllm:kv_cache_usage_perc") == 0.0


def test_pd_logprobs_and_n_samples_on_one_gpu_match_colocated(instances):
    """The first token's logprobs travel from prefill with its KV; decode starts sample 1 from the
    transferred prompt blocks. Greedy: the tokens are exact; the logprobs agree within bf16 noise
    (the two sides' block sizes differ, so their attention kernels sum in another order)."""
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 2, "n": 2}
    expected = httpx.post(colocated.url + "/v1/completions", json=body, timeout=120).json()["choices"]
    run = PDRun(prefill, decode, "completions", body, "gpu-logprobs-n2").run(120)
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    (reply,) = run.events
    got = sorted(reply["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in got] == [c["text"] for c in sorted(expected, key=lambda c: c["index"])]
    for have, want in zip(got, sorted(expected, key=lambda c: c["index"])):
        assert have["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert have["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=0.05)
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:kv_cache_usage_perc") == 0.0


# The speculating decode's graphs: all on (as served), verify graphs off, every graph off. On an
# H100 (8333817) the first gave the colocated text for about a dozen tokens, then other tokens,
# while the CPU gives it whole: the three together say which GPU path is at fault.
SPEC_GRAPHS = {"graphs": ((), {}), "no_verify_graphs": ((), {"RTPLLM_SPEC_VERIFY_GRAPHS": "0"}),
               "eager": (("--enforce-eager",), {})}


@pytest.fixture(scope="module", params=list(SPEC_GRAPHS))
def speculating_decode(request, instances):
    """A decode instance whose draft model is the target itself: every draft should be accepted."""
    flags, env = SPEC_GRAPHS[request.param]
    spec = {"method": "draft_model", "model": MODEL, "num_speculative_tokens": 3, "adaptive": False}
    instance = Instance("--device", "cuda", "--kv-host-cache-gib", "0", "--gpu-memory-utilization", "0.15",
                        "--role", "decode", "--block-size", "16", "--pd-timeout-s", "20", *flags,
                        "--speculative-config", json.dumps(spec), env=env, model=MODEL, tcp=False)
    try:
        yield instance.wait_ready(300)
    finally:
        instance.stop()


def test_speculating_decode_on_one_gpu_is_token_exact(instances, speculating_decode):
    colocated, prefill, _ = instances
    body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0}
    expected = httpx.post(colocated.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    run = PDRun(prefill, speculating_decode, "completions", {**body, "stream": True},
                f"gpu-spec-{speculating_decode.port}").run(120)
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text() == expected
    drafts = speculating_decode.metric("rtpllm:spec_decode_num_draft_tokens_total")
    accepted = speculating_decode.metric("rtpllm:spec_decode_num_accepted_tokens_total")
    assert drafts >= 3 and accepted >= 0.8 * drafts, (accepted, drafts)
    assert speculating_decode.metric("rtpllm:kv_cache_usage_perc") == 0.0
