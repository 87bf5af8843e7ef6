"""Speculative decoding with tensor parallelism on the CPU (gloo, a process per rank): rank 0
proposes and verifies, every rank runs the verify step over the drafts rank 0 sends with the step.
Greedy output at TP=2 equals TP=1 without speculation (float32), with n-gram drafts and with the
oracle's long accepted runs (fewer steps than tokens); sampled requests with logprobs mixed in
still finish, and with a draft model (unsharded, on rank 0); no KV block leaks; an EAGLE-3 head
(on rank 0, with a whole copy of the target's embedding, which the ranks split) drafts at TP=2 the
tokens it drafts at TP=1.
"""

import json
import os
import random

import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.spec.oracle import OracleProposer
from rtpllm.tools.eagle3_checkpoint import write_eagle3_checkpoint

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
ENGINE = dict(num_blocks=128, block_size=16, max_num_batched_tokens=64)  # 64: the long prompt prefills in chunks


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    mixed = [[rng.randrange(3, 500) for _ in range(n)] for n in (6, 19, 83)]
    return mixed + [mixed[0] * 5]  # one that repeats itself: n-gram drafts from the prompt


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def target():
    return checkpoint_path("llama3")


@pytest.fixture(scope="module")
def expected(target):
    return _tokens(LLM(model=target, **ENGINE).generate(_prompts(), GREEDY))


@pytest.fixture(scope="module")
def llm(target):
    config = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, adaptive=False)
    engine = LLM(model=target, tensor_parallel_size=2, speculative_config=config, **ENGINE)
    try:
        yield engine
    finally:
        engine.engine.shutdown()  # one tensor-parallel engine per process: later modules start their own


def test_ngram_at_tp2_is_token_exact(llm, expected):
    before = llm.engine.stats().spec.num_draft_tokens
    assert _tokens(llm.generate(_prompts(), GREEDY)) == expected
    assert llm.engine.stats().spec.num_draft_tokens > before
    assert llm.engine.check_kv_pool_free()


def test_oracle_runs_at_tp2_are_exact_and_take_fewer_steps(llm, expected):
    full = [p + t for p, t in zip(_prompts(), expected)]
    proposer, llm.engine.spec.proposer = llm.engine.spec.proposer, OracleProposer(full, torch.device("cpu"), 1.0,
                                                                                  vocab_size=512)
    try:
        counters = llm.engine.stats().spec
        drafts, accepted = counters.num_draft_tokens, counters.num_accepted_tokens
        steps = llm.engine.scheduler.stats().num_steps
        assert _tokens(llm.generate(_prompts(), GREEDY)) == expected
        counters = llm.engine.stats().spec
        assert counters.num_draft_tokens - drafts == counters.num_accepted_tokens - accepted > 0
        # Prefill chunks + about NEW_TOKENS / 5 verify steps, all requests together.
        assert llm.engine.scheduler.stats().num_steps - steps <= 3 + NEW_TOKENS // 5 + 2
    finally:
        llm.engine.spec.proposer = proposer
    assert llm.engine.check_kv_pool_free()


def test_sampled_requests_with_logprobs_speculate_at_tp2(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=12, logprobs=2, ignore_eos=True)
    outputs = llm.generate(_prompts(), params)
    for out in outputs:
        assert len(out.outputs[0].token_ids) == 12 and len(out.outputs[0].logprobs) == 12
    assert llm.engine.check_kv_pool_free()


def test_a_draft_model_at_tp2_runs_on_rank_0_and_is_token_exact(target, expected, llm):
    """The draft (here the target itself: every draft is accepted) runs unsharded on rank 0 with its
    KV beside the target's shard; every rank sized its pool alike."""
    llm.engine.shutdown()  # one tensor-parallel engine per process
    config = dict(method="draft_model", num_speculative_tokens=3, model=target, adaptive=False)
    drafted = LLM(model=target, tensor_parallel_size=2, speculative_config=config, **ENGINE)
    try:
        assert _tokens(drafted.generate(_prompts(), GREEDY)) == expected
        counters = drafted.engine.stats().spec
        assert counters.num_draft_tokens > 0 and counters.num_accepted_tokens == counters.num_draft_tokens
        assert drafted.engine.check_kv_pool_free()
    finally:
        drafted.engine.shutdown()


@pytest.fixture(scope="module")
def eagle3_head(target, tmp_path_factory):
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    return write_eagle3_checkpoint(str(tmp_path_factory.mktemp("eagle3")), config, draft_vocab_size=128,
                                   aux_layer_ids=[0, 1, 1], intermediate_size=96, std=0.15, seed=3)


def test_eagle3_at_tp2_drafts_as_at_tp1_and_is_token_exact(target, eagle3_head, expected, llm):
    """The head runs on rank 0 with a whole copy of the target's embedding (the ranks split it):
    it sees the same features and tokens as at TP=1, so it drafts the same tokens (float32). (This
    random head's drafts are never accepted, so the drafts themselves are compared.)"""
    llm.engine.shutdown()  # one tensor-parallel engine per process
    config = dict(method="eagle3", num_speculative_tokens=3, model=eagle3_head, adaptive=False)
    one = LLM(model=target, speculative_config=config, **ENGINE)
    want = _recorded_drafts(one)
    assert _tokens(one.generate(_prompts(), GREEDY)) == expected
    two = LLM(model=target, tensor_parallel_size=2, speculative_config=config, **ENGINE)
    try:
        got = _recorded_drafts(two)
        assert _tokens(two.generate(_prompts(), GREEDY)) == expected
        assert len(got) == len(want) > 0 and got == want
        assert two.engine.stats().spec.num_draft_tokens == one.engine.stats().spec.num_draft_tokens
        assert two.engine.check_kv_pool_free()
    finally:
        two.engine.shutdown()


def _recorded_drafts(llm: LLM) -> list:
    """Every later proposal's draft tokens (appended as the engine proposes)."""
    proposer, drafts = llm.engine.spec.proposer, []
    propose = proposer.propose

    def recording(batch, seqs):
        proposal = propose(batch, seqs)
        drafts.append(proposal.token_ids.tolist())
        return proposal

    proposer.propose = recording
    return drafts


def test_eagle3_at_tp2_needs_the_targets_safetensors(target, eagle3_head, tmp_path):
    """A target whose checkpoint the head cannot read its embedding from is refused at start."""
    from rtpllm.spec.eagle3 import _whole_target_embedding

    arch = type("Arch", (), dict(vocab_size=512, hidden_size=128))
    with pytest.raises(ValueError, match="speculative_config.model: EAGLE-3 with tensor parallelism"):
        _whole_target_embedding(str(tmp_path), arch, torch.float32)
