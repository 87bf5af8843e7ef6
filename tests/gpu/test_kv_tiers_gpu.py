"""KV tiers on the GPU: the prefix-heavy workload of the CPU tier tests (working set several times a
16-block pool), through the host tier with each CUDA copy method and through host + disk (pipelined
disk reads: reader threads submit, a completion thread waits on the CUDA copies). Blocks really come
back from the tiers, and every configuration gives the tokens of the default (kernel) one: the
copies move the same bytes whatever the method or the tier."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from kv_tier_workload import BLOCK_SIZE, generate, make_llm, prompts  # noqa: E402

PROMPTS = prompts(seed=1, count=12)
# The CUDA attention kernels take head_dim 64 or 128: SmolLM2's 9:3 GQA shape, 2 layers, in bf16.
MODEL, DTYPE, KV_HEADS, HEAD_DIM = "gqa9x3", "bfloat16", 3, 64


def _run(**options) -> tuple[list[list[int]], dict]:
    llm = make_llm(MODEL, device="cuda", dtype=DTYPE, **options)
    outputs = generate(llm, PROMPTS)
    llm.engine.kv_tiers.flush()
    outputs += generate(llm, PROMPTS[:6])  # again: now also from the disk where there is one
    stats = {t.name: t for t in llm.engine.stats().kv_tiers}
    llm.engine.kv_tiers.check_invariants()
    llm.engine.close()
    return outputs, stats


@pytest.fixture(scope="module")
def kernel_run():
    return _run(kv_host_cache_gib=0.05, kv_copy_method="kernel")


@pytest.mark.parametrize("method", ["staged", "hybrid", "memcpy"])
def test_host_tier_copy_methods_give_the_kernel_tokens(kernel_run, method):
    expected, kernel_stats = kernel_run
    assert kernel_stats["host"].loaded_blocks >= 10
    outputs, stats = _run(kv_host_cache_gib=0.05, kv_copy_method=method)
    assert stats["host"].loaded_blocks >= 10
    assert stats["host"].failed_loads == 0
    assert outputs == expected


def test_host_and_disk_tiers_give_the_kernel_tokens(kernel_run, tmp_path):
    expected, _ = kernel_run
    # A host tier of 4 blocks: most hits come from the disk.
    host_gib = 4 * 2 * 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2 / 2**30  # 4 blocks of 2 layers x {K, V}, bf16
    outputs, stats = _run(kv_host_cache_gib=host_gib, kv_disk_cache_dir=str(tmp_path), kv_copy_method="staged")
    assert stats["disk"].loaded_blocks >= 5
    assert stats["disk"].failed_loads == 0
    assert outputs == expected
