"""Speculative decoding end to end on the CPU (tiny random checkpoints, float32): greedy output is
token-exact with and without each proposer, in every scheduling situation, and KV blocks never leak.

Random-weight models rarely repeat themselves, so n-gram drafts are mostly rejected here; the
oracle proposer (the target's own recorded continuation, corrupted at a chosen rate) drives long
accepted runs through the same engine path.
"""

import random

import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.spec.oracle import OracleProposer

TARGET = "llama3"
DRAFT = "gqa9x3"  # same tokenizer and vocabulary, different weights
NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def prompts(seed=0, lengths=(5, 17, 40, 71), prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec(method, k=3, **extra):
    config = dict(method=method, num_speculative_tokens=k, adaptive=False, **extra)
    if method == "draft_model":
        config.setdefault("model", checkpoint_path(DRAFT))
    return config


@pytest.fixture(scope="module")
def target():
    return checkpoint_path(TARGET)


@pytest.fixture(scope="module")
def baseline(target):
    llm = LLM(model=target, num_blocks=128, block_size=16)
    mixed = prompts(1) + [prompts(2, (9,))[0] * 4]  # one prompt that repeats itself
    return dict(mixed=mixed, expected=tokens(llm.generate(mixed, GREEDY)))


def make(target, config, **options):
    options.setdefault("num_blocks", 128)
    options.setdefault("block_size", 16)
    return LLM(model=target, speculative_config=config, **options)


@pytest.mark.parametrize("config", [spec("ngram", 4, prompt_lookup_min=1), spec("draft_model", 3)],
                         ids=["ngram", "draft_model"])
def test_greedy_is_token_exact(target, baseline, config):
    llm = make(target, config)
    assert tokens(llm.generate(baseline["mixed"], GREEDY)) == baseline["expected"]
    counters = llm.engine.stats().spec
    assert counters.method == config["method"] and counters.num_draft_tokens > 0
    assert llm.engine.check_kv_pool_free()


def test_draft_identical_to_target_accepts_everything(target, baseline):
    llm = make(target, spec("draft_model", 4, model=target))
    assert tokens(llm.generate(baseline["mixed"], GREEDY)) == baseline["expected"]
    counters = llm.engine.stats().spec
    assert counters.num_draft_tokens > 0
    assert counters.num_accepted_tokens == counters.num_draft_tokens
    assert counters.mean_accepted_length > 4.0  # 5 per step, less the steps capped by max_tokens
    assert llm.engine.check_kv_pool_free()


@pytest.mark.parametrize("acceptance", [1.0, 0.6])
def test_oracle_runs_are_exact_and_fast(target, baseline, acceptance):
    llm = make(target, spec("ngram", 5))
    full = [p + t for p, t in zip(baseline["mixed"], baseline["expected"])]
    llm.engine.spec.proposer = OracleProposer(full, torch.device("cpu"), acceptance, vocab_size=512)
    assert tokens(llm.generate(baseline["mixed"], GREEDY)) == baseline["expected"]
    counters = llm.engine.stats().spec
    if acceptance == 1.0:
        assert counters.num_accepted_tokens == counters.num_draft_tokens
        # Prefill + about NEW_TOKENS / 6 steps per request, all requests together.
        assert llm.engine.scheduler.stats().num_steps <= 2 + NEW_TOKENS // 6 + 2
    else:
        assert 0 < counters.num_accepted_tokens < counters.num_draft_tokens
    assert llm.engine.check_kv_pool_free()


def test_mixed_batch_of_greedy_random_penalized_and_logprob_requests(target, baseline):
    """Every kind speculates (penalties too: tests/py/test_spec_penalties.py); greedy ones stay exact."""
    plain = LLM(model=target, num_blocks=128, block_size=16)
    llm = make(target, spec("draft_model", 3))
    ps = baseline["mixed"][:4]
    params = [GREEDY,
              SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=NEW_TOKENS, ignore_eos=True, seed=7)]
    want = plain.generate(ps, params)
    got = llm.generate(ps, params)
    assert tokens(got)[:3] == tokens(want)[:3]
    assert len(got[3].outputs[0].token_ids) == NEW_TOKENS
    for a, b in zip(got[2].outputs[0].logprobs, want[2].outputs[0].logprobs):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    assert llm.engine.check_kv_pool_free()


@pytest.mark.parametrize("stop_string", [False, True])
def test_logprobs_and_min_tokens_speculate(target, baseline, stop_string):
    """Sequences asking for logprobs, and sequences past their min_tokens, speculate: every emitted
    token's logprob (and top-N) equals decoding without speculation, across long accepted runs."""
    ps = baseline["mixed"][:3]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, min_tokens=9),
              SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=12)]
    if stop_string:  # tokens go to the request one at a time, each with its own logprobs
        params[0] = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3,
                                   stop=["never appears \x00"])
    want = LLM(model=target, num_blocks=128, block_size=16).generate(ps, params)
    llm = make(target, spec("ngram", 4))
    full = [p + list(o.outputs[0].token_ids) for p, o in zip(ps, want)]
    llm.engine.spec.proposer = OracleProposer(full, torch.device("cpu"), 1.0, vocab_size=512)
    got = llm.generate(ps, params)
    assert tokens(got) == tokens(want)
    for g, w in zip(got[:2], want[:2]):
        assert len(g.outputs[0].logprobs) == len(w.outputs[0].logprobs) == NEW_TOKENS
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
        assert abs(g.outputs[0].cumulative_logprob - w.outputs[0].cumulative_logprob) < 1e-3
    counters = llm.engine.stats().spec
    # All three speculate (the last two once past their min_tokens): the third takes 11 one-token
    # steps after its prefill, then about 3 steps of 5 tokens.
    assert counters.num_accepted_tokens == counters.num_draft_tokens >= 30
    assert llm.engine.scheduler.stats().num_steps <= 1 + 11 + 5
    assert llm.engine.check_kv_pool_free()


def test_preemption_and_chunked_prefill(target, baseline):
    # 14 blocks of 16 tokens cannot hold all five requests at once; a 48-token budget chunks prompts.
    llm = make(target, spec("draft_model", 3), num_blocks=14, max_num_batched_tokens=48)
    assert tokens(llm.generate(baseline["mixed"], GREEDY)) == baseline["expected"]
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.check_kv_pool_free()


def test_prefix_hits(target):
    shared = prompts(3, (40,))[0]
    ps = prompts(4, (3, 9, 20), prefix=shared)
    want = tokens(LLM(model=target, num_blocks=128, block_size=16).generate(ps, GREEDY))
    llm = make(target, spec("draft_model", 3))
    assert tokens(llm.generate(ps[:1], GREEDY)) == want[:1]
    assert tokens(llm.generate(ps[1:], GREEDY)) == want[1:]
    assert llm.engine.stats().prefix_cache_hits >= 2 * 32
    assert llm.engine.check_kv_pool_free()


def test_abort_mid_speculation(target, baseline):
    llm = make(target, spec("draft_model", 4))
    engine = llm.engine
    for i, p in enumerate(baseline["mixed"]):
        engine.add_request(f"r{i}", p, GREEDY, stream=False)
    for _ in range(3):
        engine.step()
    assert engine.stats().spec.num_spec_steps > 0
    engine.abort_request("r1")
    engine.abort_request("r3")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert done["r1"].outputs[0].finish_reason == "abort"
    for i in (0, 2, 4):
        assert list(done[f"r{i}"].outputs[0].token_ids) == baseline["expected"][i]
    assert engine.check_kv_pool_free()


def test_async_scheduling_alternates_with_speculative_steps(target, baseline):
    llm = make(target, spec("ngram", 4, prompt_lookup_min=1), async_scheduling=True)
    assert tokens(llm.generate(baseline["mixed"], GREEDY)) == baseline["expected"]
    assert llm.engine.check_kv_pool_free()


def test_stop_tokens_cut_accepted_runs(target, baseline):
    llm = make(target, spec("ngram", 5))
    full = [p + t for p, t in zip(baseline["mixed"], baseline["expected"])]
    llm.engine.spec.proposer = OracleProposer(full, torch.device("cpu"), 1.0)
    stop_at = [t[7] for t in baseline["expected"]]
    got = llm.generate(baseline["mixed"], [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                                          stop_token_ids=[s]) for s in stop_at])
    for out, want, stop in zip(got, baseline["expected"], stop_at):
        cut = want.index(stop)
        assert list(out.outputs[0].token_ids) == want[:cut + 1]
        assert out.outputs[0].finish_reason == "stop"
    assert llm.engine.check_kv_pool_free()


def test_bad_speculative_config_fails_at_start(target):
    with pytest.raises(ValueError, match="speculative_config.model"):
        make(target, spec("draft_model", 2, model=checkpoint_path("qwen2")))  # another vocabulary size
    with pytest.raises(ValueError, match="max_model_len"):  # a draft with a shorter context (512) than the target's
        make(target, spec("draft_model", 2, model=checkpoint_path("mistral")))
    with pytest.raises(ValueError, match="speculative_config.method"):
        make(target, dict(method="medusa", num_speculative_tokens=2))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        make(target, dict(method="ngram", num_speculative_tokens=99))
