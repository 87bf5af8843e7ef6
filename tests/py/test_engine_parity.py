"""The whole engine (C++ scheduler + model + sampler) is token-exact with transformers in float32.

Every variant, every scheduling situation: one request at a time, all at once, a prefix-cache hit,
chunked prefill under a tiny token budget, and a KV pool so small that preemption happens.
"""

import random

import pytest
import torch

from checkpoints import VARIANTS, checkpoint_path, load_hf_reference
from rtpllm import LLM, SamplingParams

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 17, 40, 71)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts(vocab: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


@torch.inference_mode()
def _reference_greedy(hf_model, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation, recomputed from scratch each step (no cache to trust)."""
    tokens = list(prompt)
    for _ in range(NEW_TOKENS):
        logits = hf_model(torch.tensor([tokens])).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    path = checkpoint_path(request.param)
    hf_model = load_hf_reference(path)
    vocab = hf_model.config.vocab_size
    plain = _prompts(vocab, seed=11)
    shared = _prompts(vocab, seed=12, shared_prefix=48)
    expected = {tuple(p): _reference_greedy(hf_model, p) for p in plain + shared}
    return dict(name=request.param, path=path, hf=hf_model, plain=plain, shared=shared, expected=expected)


def _generated(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _assert_matches(variant, prompts, outputs):
    for prompt, got in zip(prompts, _generated(outputs)):
        assert got == variant["expected"][tuple(prompt)], f"{variant['name']}: prompt of {len(prompt)} tokens"


def test_one_request_at_a_time(variant):
    llm = LLM(model=variant["path"], num_blocks=64, block_size=16)
    for prompt in variant["plain"]:
        _assert_matches(variant, [prompt], llm.generate([prompt], GREEDY))
    assert llm.engine.check_kv_pool_free()


def test_all_at_once(variant):
    llm = LLM(model=variant["path"], num_blocks=64, block_size=16)
    _assert_matches(variant, variant["plain"], llm.generate(variant["plain"], GREEDY))
    assert llm.engine.check_kv_pool_free()


def test_prefix_cache_hit_gives_the_same_tokens(variant):
    llm = LLM(model=variant["path"], num_blocks=128, block_size=8, enable_prefix_caching=True)
    _assert_matches(variant, variant["shared"][:1], llm.generate(variant["shared"][:1], GREEDY))
    hits_before = llm.engine.stats().prefix_cache_hits
    _assert_matches(variant, variant["shared"], llm.generate(variant["shared"], GREEDY))
    assert llm.engine.stats().prefix_cache_hits - hits_before >= 48 * (len(PROMPT_LENGTHS) - 1)
    assert llm.engine.check_kv_pool_free()


def test_chunked_prefill_under_a_tiny_token_budget(variant):
    llm = LLM(model=variant["path"], num_blocks=64, block_size=16, max_num_batched_tokens=7,
              enable_chunked_prefill=True)
    _assert_matches(variant, variant["plain"], llm.generate(variant["plain"], GREEDY))
    assert llm.engine.check_kv_pool_free()


def test_preemption_in_a_tiny_kv_pool(variant):
    # The longest request alone needs (71 + 32) / 4 = 26 blocks; all four together need 65.
    llm = LLM(model=variant["path"], num_blocks=30, block_size=4, enable_prefix_caching=False)
    _assert_matches(variant, variant["plain"], llm.generate(variant["plain"], GREEDY))
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.check_kv_pool_free()


@torch.inference_mode()
def test_prompt_and_sampled_logprobs_match_transformers(variant):
    llm = LLM(model=variant["path"], num_blocks=64, block_size=16, max_num_batched_tokens=16)
    prompt = variant["plain"][3]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate([prompt], params)[0]
    tokens = prompt + list(out.outputs[0].token_ids)
    reference = torch.log_softmax(variant["hf"](torch.tensor([tokens])).logits[0].float(), dim=-1)

    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    worst = 0.0
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry and len(entry) >= 2
        for token, value in entry.items():
            worst = max(worst, abs(value - float(reference[pos - 1, token])))
    for step, entry in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) + step - 1
        top3 = set(reference[pos].topk(3).indices.tolist())
        assert top3 <= set(entry), "the top-3 logprobs are the reference's top 3"
        for token, value in entry.items():
            worst = max(worst, abs(value - float(reference[pos, token])))
    assert worst < 1e-4, f"{variant['name']}: logprob max abs diff {worst:.2e}"


def test_async_scheduling_gives_the_same_tokens(variant):
    # One step in flight: placeholders fed from the previous step's samples, outputs one step late.
    for kwargs in (dict(num_blocks=64, block_size=16), dict(num_blocks=30, block_size=4, enable_prefix_caching=False),
                   dict(num_blocks=64, block_size=16, max_num_batched_tokens=7)):
        llm = LLM(model=variant["path"], async_scheduling=True, **kwargs)
        _assert_matches(variant, variant["plain"], llm.generate(variant["plain"], GREEDY))
        assert llm.engine.check_kv_pool_free()
