"""Asynchronous scheduling (one step in flight) gives exactly what synchronous stepping gives:
stop ids and stop strings hit mid-run, length limits, seeded sampling, n > 1, and requests whose
sampling needs the host's history (penalties, min_tokens, logprobs) mixed in, which makes the
engine fall back to synchronous steps. Every run ends with the KV pool free."""

import pytest

from checkpoints import VARIANTS, checkpoint_path
from rtpllm import LLM, SamplingParams

VARIANT = sorted(VARIANTS)[0]


def run(async_scheduling: bool, prompts, params, **kwargs):
    llm = LLM(model=checkpoint_path(VARIANT), async_scheduling=async_scheduling, num_blocks=48, block_size=8,
              **kwargs)
    outputs = llm.generate(prompts, params)
    assert llm.engine.check_kv_pool_free()
    assert not llm.engine.has_unfinished_requests()
    return [[(list(c.token_ids), c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def prompts():
    return [[(7 * i + 13 * j) % 200 + 3 for j in range(5 + 9 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def greedy_tokens(prompts):
    return run(False, prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))


def test_stop_ids_hit_mid_run(prompts, greedy_tokens):
    # Stop each request on a token it really generates, at different depths.
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                             stop_token_ids=[tokens[0][min(3 * i, len(tokens[0]) - 1)]])
              for i, [tokens] in enumerate(greedy_tokens)]
    assert run(True, prompts, params) == run(False, prompts, params)


def test_mixed_sampling_parameters(prompts):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=5 + 3 * i) for i in range(4)]
    params += [SamplingParams(temperature=0.8, seed=9, n=2, max_tokens=12),
               SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.3),  # host history
               SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4),
               SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)]
    assert run(True, prompts, params) == run(False, prompts, params)


def test_tiny_pool_preemption(prompts):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    got = run(True, prompts, params, max_num_seqs=8)
    assert got == run(False, prompts, params, max_num_seqs=8)


def test_stop_strings(prompts, greedy_tokens):
    llm = LLM(model=checkpoint_path(VARIANT), num_blocks=48, block_size=8)
    texts = [llm.get_tokenizer().decode(tokens[0][2:4]) for [tokens] in greedy_tokens]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[t]) for t in texts if t.strip()]
    chosen = [p for p, t in zip(prompts, texts) if t.strip()]
    assert run(True, chosen, params) == run(False, chosen, params)
