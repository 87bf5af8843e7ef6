"""Prefill-decode disaggregation with tensor parallelism on two GPUs: a prefill and a decode
instance at TP=2 each (both on GPUs 0 and 1, with part of their memory), every rank moving its own
KV heads over UCX (CUDA IPC between the processes of one GPU). The output is token-exact against a
colocated TP=2 instance; both pools end idle.

    python -m pytest -q tests/gpu/test_pd_tp_gpu.py      # needs 2 GPUs
"""

from __future__ import annotations

import os
import sys

import httpx
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from checkpoints import checkpoint_path  # noqa: E402
from pd_driver import PD_GPU_TRIO, PDRun, started_one_at_a_time  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not getattr(__import__("rtpllm._C")._C, "has_ucx", False), reason="rtpllm._C built without UCX"),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

PROMPT = "Two tensor-parallel ranks on each side, each moving its own heads of the KV cache " * 8
MODEL = checkpoint_path("qwen3")  # head_dim 64 (the CUDA attention kernels take 64 or 128), 2 KV heads: 1 per rank
COMMON = ("--device", "cuda", "--kv-host-cache-gib", "0", "--gpu-memory-utilization", "0.25",
          "--tensor-parallel-size", "2")


@pytest.fixture(scope="module")
def instances():
    with started_one_at_a_time(PD_GPU_TRIO, *COMMON, model=MODEL, tcp=False) as started:
        yield started


@pytest.mark.parametrize("overlap", [False, True])
def test_pd_at_tp2_on_two_gpus_is_token_exact(instances, overlap):
    colocated, prefill, decode = instances
    body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0}
    expected = httpx.post(colocated.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    run = PDRun(prefill, decode, "completions", {**body, "stream": True}, f"gpu-tp2-{overlap}").run(120, overlap=overlap)
    assert run.reservation_error is None, run.reservation_error
    assert len(run.destination["transfer_endpoints"]) == 1
    assert run.prefill_response.status_code == 200, run.prefill_response.text
    assert run.text() == expected
    for instance in (prefill, decode):
        assert instance.metric("rtpllm:kv_cache_usage_perc") == 0.0
