"""Prefill-decode disaggregation on one GPU with --pd-direct-copy on both instances: the prefill's
transfer engine maps the decode pool over CUDA IPC and writes each layer with its own copy kernel
(DataPath.DIRECT) instead of UCX's CUDA IPC transport. Token-exact against a colocated instance,
streamed and not, with the pools idle afterwards (the same checks as test_pd_gpu.py's UCX path).

    python -m pytest -q tests/gpu/test_pd_direct_gpu.py
"""

from __future__ import annotations

import os
import sys

import httpx
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from checkpoints import checkpoint_path  # noqa: E402
from pd_driver import PD_GPU_TRIO, PDRun, started_one_at_a_time  # noqa: E402

pytestmark = pytest.mark.skipif(not getattr(__import__("rtpllm._C")._C, "has_ucx", False),
                                reason="rtpllm._C built without UCX (pip install libucx-cu13, then rebuild)")

PROMPT = "The prefill instance writes every layer straight into the decode instance's mapped pool " * 10
MODEL = checkpoint_path("gqa9x3")  # head_dim 64: the CUDA attention kernels take 64 or 128


@pytest.fixture(scope="module")
def instances():
    colocated, prefill, decode = PD_GPU_TRIO
    trio = (colocated, (*prefill, "--pd-direct-copy"), (*decode, "--pd-direct-copy"))
    common = ("--device", "cuda", "--kv-host-cache-gib", "0", "--gpu-memory-utilization", "0.25")
    with started_one_at_a_time(trio, *common, model=MODEL, tcp=False) as started:
        yield started


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_direct_copy_pd_is_token_exact_against_colocated(instances, stream, overlap):
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0}
    expected = httpx.post(colocated.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    run = PDRun(prefill, decode, "completions", {**body, "stream": stream},
                f"gpu-direct-{stream}-{overlap}").run(120, overlap=overlap)
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.prefill_response.json()["transferred_bytes"] > 0
    assert run.text() == expected
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:kv_cache_usage_perc") == 0.0
