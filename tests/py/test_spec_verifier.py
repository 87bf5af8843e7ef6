"""Speculative verification: greedy is exact, rejection sampling preserves the target distribution.

The statistical tests draw many independent sequences over a tiny vocabulary (one batch on the
CPU) and compare the emitted tokens' histogram with the target distribution by a chi-square
statistic. The bound is the 1e-4 upper quantile, so a correct sampler fails about once in 10,000
runs (the seeds are fixed, so the test is deterministic); a biased one fails by a wide margin,
which the last test checks with a deliberately wrong verifier.
"""

import numpy as np
import pytest
import torch

from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.sampling_params import SamplingParams
from rtpllm.spec.verifier import VerifyLayout, verify

VOCAB = 6
K = 3
NUM_SEQS = 20000
# Upper 1e-4 quantiles of the chi-square distribution by degrees of freedom.
CHI2_CRITICAL = {3: 21.108, 4: 23.513, 5: 25.745}


def sampling_batch(n, **params):
    gen = torch.Generator().manual_seed(1234)
    return SamplingBatch.build([SamplingParams(**params)] * n, [[]] * n, [[]] * n, [None] * n, "cpu",
                               default_generator=gen)


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    support = probs > 0
    assert tokens.size > 1000
    assert np.all(support[tokens]), "emitted a token outside the target's support"
    counts = np.bincount(tokens, minlength=probs.size)[support]
    expected = probs[support] * tokens.size
    return float(((counts - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def run(target_logits_row, q_row, params, claimed_q=None, seed=0):
    """Every sequence has K drafts drawn from q; the target's distribution is the same at every
    position (a context-free model), so every emitted token must follow the filtered p."""
    torch.manual_seed(seed)
    layout = VerifyLayout.build(np.full(NUM_SEQS, K), torch.device("cpu"))
    logits = torch.as_tensor(target_logits_row, dtype=torch.float32).repeat(layout.num_rows, 1)
    q = torch.as_tensor(q_row, dtype=torch.float32)
    drafts = torch.multinomial(q, NUM_SEQS * K, replacement=True)
    told = q if claimed_q is None else torch.as_tensor(claimed_q, dtype=torch.float32)
    draft_probs = told.repeat(NUM_SEQS * K, 1)
    tokens, accepted = verify(logits, layout, sampling_batch(NUM_SEQS, **params), drafts, draft_probs)
    return tokens.view(NUM_SEQS, K + 1).numpy(), accepted.numpy()


def filtered(logits_row, temperature, top_k):
    z = np.asarray(logits_row, dtype=np.float64) / temperature
    keep = z >= np.sort(z)[-top_k] if top_k > 0 else np.ones_like(z, dtype=bool)
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


LOGITS = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5]
Q = [0.1, 0.3, 0.15, 0.2, 0.2, 0.05]  # well off p, so that rejections and corrections are common


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=4)])
def test_rejection_sampling_preserves_the_target_distribution(params):
    tokens, accepted = run(LOGITS, Q, params)
    p = filtered(LOGITS, params["temperature"], params.get("top_k", 0))
    for position in range(K + 1):
        emitted = tokens[:, position][tokens[:, position] >= 0]
        stat, dof = chi_square(emitted, p)
        assert stat < CHI2_CRITICAL[dof], f"position {position}: chi2 {stat:.1f} with {dof} dof"
    # Acceptance follows theory: P(accept) = sum_x min(p(x), q(x)).
    expected_rate = np.minimum(p, np.asarray(Q)).sum()
    first_accepted = (accepted >= 1).mean()
    assert abs(first_accepted - expected_rate) < 0.02


def test_point_mass_drafts_preserve_the_distribution():
    """n-gram drafts: q is a point mass at the draft, whatever token it is."""
    torch.manual_seed(5)
    layout = VerifyLayout.build(np.full(NUM_SEQS, K), torch.device("cpu"))
    logits = torch.as_tensor(LOGITS).repeat(layout.num_rows, 1)
    drafts = torch.full((NUM_SEQS * K,), 3, dtype=torch.int64)  # always propose the likeliest token
    tokens, _ = verify(logits, layout, sampling_batch(NUM_SEQS, temperature=1.0), drafts, None)
    emitted = tokens.view(NUM_SEQS, K + 1)[:, 1].numpy()
    stat, dof = chi_square(emitted[emitted >= 0], filtered(LOGITS, 1.0, 0))
    assert stat < CHI2_CRITICAL[dof]


def test_the_chi_square_check_catches_a_biased_verifier():
    """A verifier told the wrong draft distribution (here uniform, e.g. q taken before the filters)
    is biased; the same bound must reject it by a wide margin."""
    tokens, _ = run(LOGITS, Q, dict(temperature=1.0), claimed_q=[1 / VOCAB] * VOCAB)
    p = filtered(LOGITS, 1.0, 0)
    emitted = tokens[:, 0]
    stat, dof = chi_square(emitted, p)
    assert stat > 10 * CHI2_CRITICAL[dof]


def test_greedy_accepts_the_argmax_run_then_corrects():
    # Two sequences: 3 drafts and 2 drafts. Target argmax per row chosen by one-hot logits.
    layout = VerifyLayout.build(np.array([3, 2]), torch.device("cpu"))
    argmax = [4, 1, 2, 5, 0, 3, 3]  # rows: seq0 0..3, seq1 4..6
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), VOCAB).float()
    drafts = torch.tensor([4, 1, 9 % VOCAB, 0, 3])  # seq0: 4, 1 right, third wrong; seq1: both right
    tokens, accepted = verify(logits, layout, sampling_batch(2, temperature=0.0), drafts, None)
    assert tokens.tolist() == [4, 1, 2, -1, 0, 3, 3]
    assert accepted.tolist() == [2, 2]


def test_sequences_without_drafts_take_one_token():
    layout = VerifyLayout.build(np.array([0, 2, 0]), torch.device("cpu"))
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4, 5]), VOCAB).float()
    tokens, accepted = verify(logits, layout, sampling_batch(3, temperature=0.0), torch.tensor([2, 0]), None)
    assert tokens.tolist() == [1, 2, 3, -1, 5]
    assert accepted.tolist() == [0, 1, 0]
