"""The shared remote KV store with GPU pools: `rtpllm kvstore serve` as a process and two engine
instances on one GPU; UCX picks the transports (GPU memory <-> the store's host memory). The second
instance loads the prefixes the first computed and answers with the tokens a prefix-cache hit
gives (each prompt alone, so that both runs compute the same suffix the same way).

Needs rtpllm._C built with RTPLLM_CUDA=1 and UCX (the libucx-cu13 wheel installed at build time).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from rtpllm import LLM, SamplingParams
from rtpllm.tools.bpe_tokenizer import build_bpe_tokenizer

VOCAB = 512
BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    tokenizer = build_bpe_tokenizer(VOCAB, add_bos=False)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def store():
    proc = subprocess.Popen([sys.executable, "-m", "rtpllm.serving.cli", "kvstore", "serve", "--capacity-gib", "1",
                             "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    yield line.split()[-1]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, VOCAB) for _ in range(8 * BLOCK + rng.randrange(1, 15))] for _ in range(4)]


def one_by_one(llm: LLM, batch) -> list[list[int]]:
    return [list(llm.generate([p], GREEDY)[0].outputs[0].token_ids) for p in batch]


def test_a_second_gpu_instance_loads_what_the_first_computed(checkpoint, store):
    reference = LLM(model=checkpoint, gpu_memory_utilization=0.15, kv_host_cache_gib=0, block_size=BLOCK)
    one_by_one(reference, prompts())
    expected = one_by_one(reference, prompts())  # the prefixes now hit the GPU prefix cache
    del reference

    first = LLM(model=checkpoint, gpu_memory_utilization=0.15, kv_host_cache_gib=0, block_size=BLOCK, kv_store=store)
    one_by_one(first, prompts())
    first.engine.kv_tiers.flush()
    assert {t.name: t for t in first.engine.stats().kv_tiers}["remote"].saved_blocks >= 4 * 8

    second = LLM(model=checkpoint, gpu_memory_utilization=0.15, kv_host_cache_gib=0, block_size=BLOCK, kv_store=store)
    assert one_by_one(second, prompts()) == expected
    remote = {t.name: t for t in second.engine.stats().kv_tiers}["remote"]
    # Every prefix is offered: loaded, or skipped once the store's measured load time exceeds what
    # recomputing takes (this 4-layer model recomputes 8 blocks on an H100 faster than a round trip).
    assert remote.loaded_blocks >= 8 and remote.failed_loads == 0
    assert remote.loaded_blocks + remote.skipped_blocks >= 4 * 8
    print(f"\nremote store: {remote.loaded_blocks} blocks loaded, {remote.skipped_blocks} skipped (recompute was "
          f"cheaper), {remote.load_bytes / 2**20:.1f} MiB, "
          f"mean load {remote.load_latency_sum / max(1, remote.load_latency_count) * 1e3:.2f} ms")
