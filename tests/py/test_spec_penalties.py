"""Repetition / presence / frequency penalties under speculation: each verified row is penalised with
the history plus the drafts before it, so greedy output stays token-exact and rejection sampling
keeps the penalised target distribution (CPU, float32).

The statistical test runs many independent sequences over a tiny vocabulary with a context-free
target whose only context dependence is the penalties: the token emitted at position j must follow
p(. | history + the tokens emitted before it). A verifier that penalises with the history alone
(ignoring the drafts before a row) fails the same bound by a wide margin.
"""

import math
import random

import numpy as np
import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.layers.sampler import apply_penalties
from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.spec.oracle import OracleProposer
from rtpllm.spec.penalties import penalize_verify_rows
from rtpllm.spec.verifier import VerifyLayout, verify

# ---------------------------------------------------------------------------- verify rows


def test_each_verify_row_is_penalised_like_decoding_after_the_drafts_before_it():
    """Row j of a sequence equals what the sampler's penalties give for history + drafts[:j]."""
    rng = np.random.default_rng(0)
    vocab = 37
    counts = np.array([3, 0, 2, 4, 1])
    params = [SamplingParams(repetition_penalty=1.4), SamplingParams(),
              SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=0.9),
              SamplingParams(frequency_penalty=1.1)]
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in (5, 3, 9, 1, 4)]
    outputs = [rng.integers(0, vocab, size=n).tolist() for n in (4, 2, 0, 7, 3)]
    drafts = [rng.integers(0, vocab, size=k).tolist() for k in counts]
    layout = VerifyLayout.build(counts, torch.device("cpu"))
    logits = torch.randn(layout.num_rows, vocab) * 3
    sampling = SamplingBatch.build(params, prompts, outputs, [None] * len(params), "cpu")
    draft_ids = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
    got = penalize_verify_rows(logits, layout, sampling, draft_ids)

    row = 0
    for s, k in enumerate(counts):
        for j in range(k + 1):
            one = SamplingBatch.build([params[s]], [prompts[s]], [outputs[s] + drafts[s][:j]], [None], "cpu")
            want = logits[row:row + 1].clone()
            if one.use_penalties:
                apply_penalties(want, one)
            assert torch.equal(got[row:row + 1], want), f"sequence {s}, row {j}"
            row += 1


# ---------------------------------------------------------------------------- the distribution
VOCAB = 6
K = 3
NUM_SEQS = 20000
LOGITS = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5]
Q = [0.1, 0.3, 0.15, 0.2, 0.2, 0.05]  # well off p, so that rejections and corrections are common
HISTORY_PROMPT = [1]
HISTORY_OUTPUT = [3, 0]
PENALTIES = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6)


def chi_square_critical(dof: int) -> float:
    """Upper 1e-4 quantile of chi-square (Wilson-Hilferty; within ~1% from a few dof up)."""
    z = 3.719
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def penalised_p(context, temperature, top_k):
    """Reference in float64: the sampler's penalties for prompt HISTORY_PROMPT and output
    HISTORY_OUTPUT + context, then temperature and top-k."""
    z = np.asarray(LOGITS, dtype=np.float64)
    output = HISTORY_OUTPUT + list(context)
    for t in set(HISTORY_PROMPT + output):
        z[t] = z[t] / PENALTIES["repetition_penalty"] if z[t] > 0 else z[t] * PENALTIES["repetition_penalty"]
    for t in set(output):
        z[t] -= PENALTIES["presence_penalty"] + PENALTIES["frequency_penalty"] * output.count(t)
    z = z / temperature
    keep = z >= np.sort(z)[-top_k] if top_k > 0 else np.ones_like(z, dtype=bool)
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def run_verify(params, history_aware=True, seed=0):
    """Tokens [NUM_SEQS, K + 1] emitted by one verify step with K drafts from Q per sequence.
    history_aware=False: the biased verifier that penalises every row with the history only."""
    torch.manual_seed(seed)
    layout = VerifyLayout.build(np.full(NUM_SEQS, K), torch.device("cpu"))
    logits = torch.as_tensor(LOGITS, dtype=torch.float32).repeat(layout.num_rows, 1)
    q = torch.as_tensor(Q, dtype=torch.float32)
    drafts = torch.multinomial(q, NUM_SEQS * K, replacement=True)
    gen = torch.Generator().manual_seed(1234 + seed)
    all_params = SamplingParams(**params, **PENALTIES)
    sampling = SamplingBatch.build([all_params] * NUM_SEQS, [HISTORY_PROMPT] * NUM_SEQS,
                                   [HISTORY_OUTPUT] * NUM_SEQS, [None] * NUM_SEQS, "cpu", default_generator=gen)
    if not history_aware:
        one = SamplingBatch.build([all_params], [HISTORY_PROMPT], [HISTORY_OUTPUT], [None], "cpu")
        row = torch.as_tensor([LOGITS], dtype=torch.float32)
        apply_penalties(row, one)
        logits = row.repeat(layout.num_rows, 1)
        sampling = SamplingBatch.build([SamplingParams(**params)] * NUM_SEQS, [[]] * NUM_SEQS, [[]] * NUM_SEQS,
                                       [None] * NUM_SEQS, "cpu", default_generator=gen)
    tokens, _ = verify(logits, layout, sampling, drafts, q.repeat(NUM_SEQS * K, 1))
    return tokens.view(NUM_SEQS, K + 1).numpy()


def conditional_chi_square(tokens, params, positions=(0, 1, 2)):
    """Pooled chi-square of the token emitted at each position given the tokens before it
    (contexts seen fewer than 200 times are skipped: their expected counts would be too small)."""
    stat, dof = 0.0, 0
    for j in positions:
        reached = tokens[tokens[:, j] >= 0]
        contexts, inverse = np.unique(reached[:, :j], axis=0, return_inverse=True)
        for c, context in enumerate(contexts):
            emitted = reached[inverse.reshape(-1) == c, j]
            if emitted.size < 200:
                continue
            p = penalised_p(context.tolist(), params["temperature"], params.get("top_k", 0))
            support = p > 0
            assert np.all(support[emitted]), f"position {j}: a token outside the target's support"
            observed = np.bincount(emitted, minlength=VOCAB)[support]
            expected = p[support] * emitted.size
            stat += float(((observed - expected) ** 2 / expected).sum())
            dof += int(support.sum()) - 1
    return stat, dof


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=4)])
def test_rejection_sampling_with_penalties_preserves_the_target_distribution(params):
    tokens = run_verify(params)
    stat, dof = conditional_chi_square(tokens, params)
    assert dof >= 20  # the later positions were reached under several contexts
    assert stat < chi_square_critical(dof), f"chi2 {stat:.1f} with {dof} dof"


def test_the_chi_square_check_catches_penalties_that_ignore_the_drafts():
    params = dict(temperature=1.0)
    tokens = run_verify(params, history_aware=False)
    stat, dof = conditional_chi_square(tokens, params, positions=(1, 2))
    assert stat > 10 * chi_square_critical(dof), f"chi2 {stat:.1f} with {dof} dof"


# ---------------------------------------------------------------------------- the engine
TARGET = "llama3"
DRAFT = "gqa9x3"
NEW_TOKENS = 24


def prompts():
    rng = random.Random(1)
    ps = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 40, 71)]
    rng = random.Random(2)
    return ps + [[rng.randrange(3, 500) for _ in range(9)] * 4, ps[1][:11]]  # one repeats itself


def greedy(**penalties):
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, **penalties)


# A mixed batch: each penalty alone, all three, and a sequence without any. A random model rarely
# repeats a token within a few steps, where penalties that ignore the drafts would go wrong; values
# that reward repetition (repetition < 1, negative presence / frequency) make it loop on its recent
# tokens, so those cases decide the output. (Values as vLLM allows: presence/frequency in [-2, 2].)
MIXED = [greedy(repetition_penalty=0.5), greedy(presence_penalty=-2.0), greedy(frequency_penalty=-1.5), greedy(),
         greedy(repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.6),
         greedy(repetition_penalty=0.7, presence_penalty=0.5, frequency_penalty=-1.2)]


def tokens_of(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def target():
    return checkpoint_path(TARGET)


@pytest.fixture(scope="module")
def expected(target):
    llm = LLM(model=target, num_blocks=128, block_size=16)
    return tokens_of(llm.generate(prompts(), MIXED))


def make(target, method, k, **extra):
    config = dict(method=method, num_speculative_tokens=k, adaptive=False, **extra)
    return LLM(model=target, num_blocks=128, block_size=16, speculative_config=config)


def test_penalised_greedy_with_an_oracle_accepts_everything(target, expected):
    """The target's own (penalised) continuation is accepted in full only if every verify row is
    penalised with the drafts before it; and the output equals decoding without speculation."""
    llm = make(target, "ngram", 5)
    full = [p + t for p, t in zip(prompts(), expected)]
    llm.engine.spec.proposer = OracleProposer(full, torch.device("cpu"), 1.0, vocab_size=512)
    assert tokens_of(llm.generate(prompts(), MIXED)) == expected
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens == counters.num_draft_tokens > 0
    assert llm.engine.scheduler.stats().num_steps <= 2 + NEW_TOKENS // 6 + 2
    assert llm.engine.check_kv_pool_free()


@pytest.mark.parametrize("method,extra", [("ngram", dict(prompt_lookup_min=1)), ("draft_model", {})],
                         ids=["ngram", "draft_model"])
def test_penalised_greedy_is_token_exact(target, expected, method, extra):
    if method == "draft_model":
        extra = dict(model=checkpoint_path(DRAFT))
    llm = make(target, method, 3, **extra)
    assert tokens_of(llm.generate(prompts(), MIXED)) == expected
    assert llm.engine.stats().spec.num_draft_tokens > 0
    assert llm.engine.check_kv_pool_free()


def test_a_draft_identical_to_the_target_drafts_with_the_penalties(target, expected):
    """The draft model penalises its own steps with the history and its earlier drafts: a draft
    equal to the target then proposes exactly the target's penalised choices."""
    llm = make(target, "draft_model", 4, model=target)
    assert tokens_of(llm.generate(prompts(), MIXED)) == expected
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens == counters.num_draft_tokens > 0
    assert llm.engine.check_kv_pool_free()


def test_random_sampling_with_penalties_speculates_and_finishes(target):
    llm = make(target, "draft_model", 3, model=target)
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=NEW_TOKENS, ignore_eos=True, seed=s,
                             repetition_penalty=1.2, frequency_penalty=0.5) for s in range(3)]
    first = tokens_of(llm.generate(prompts()[:3], params))
    assert all(len(t) == NEW_TOKENS for t in first)
    assert llm.engine.stats().spec.num_accepted_tokens > 0
    assert tokens_of(llm.generate(prompts()[:3], params)) == first  # seeded: replays exactly
    assert llm.engine.check_kv_pool_free()
