"""The speculative step's host-side helpers: token history, n-gram lookup, the oracle's bookkeeping."""

import random
from types import SimpleNamespace

import numpy as np
import torch

from rtpllm.spec.history import TokenHistory
from rtpllm.spec.ngram import find_ngram_continuation
from rtpllm.spec.oracle import OracleProposer


def seq(seq_id, prompt, outputs):
    return SimpleNamespace(seq_id=seq_id, group=SimpleNamespace(prompt_ids=prompt), output_ids=outputs)


def test_token_history_appends_only_new_tokens_and_keeps_views_valid():
    history = TokenHistory()
    s = seq(1, [5, 6, 7], [])
    first = history.tokens(s)
    assert first.tolist() == [5, 6, 7]
    views = [first]
    for t in range(200):  # grows its buffer several times
        s.output_ids.append(t)
        views.append(history.tokens(s))
    assert views[-1].tolist() == [5, 6, 7] + list(range(200))
    for i, view in enumerate(views):  # earlier views still read what they read then
        assert view.tolist() == ([5, 6, 7] + list(range(200)))[:3 + i]
    history.release(set())
    assert history.tokens(seq(1, [9], [1])).tolist() == [9, 1]  # a released id starts over


def reference_ngram(tokens, min_n, max_n, k):
    """The definition: the largest n in [min_n, max_n] whose last-n suffix occurred earlier; the
    tokens after its most recent earlier occurrence."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(tokens[length - n:])
        for start in range(length - n - 1, -1, -1):
            if list(tokens[start:start + n]) == suffix:
                return list(tokens[start + n:start + n + k])
    return []


def test_ngram_lookup_matches_its_definition():
    rng = random.Random(0)
    for _ in range(3000):
        tokens = np.array([rng.randrange(rng.randrange(2, 6)) for _ in range(rng.randrange(1, 40))], dtype=np.int64)
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 7)
        k = rng.randrange(1, 6)
        assert find_ngram_continuation(tokens, min_n, max_n, k).tolist() == reference_ngram(tokens, min_n, max_n, k)


def test_oracle_follows_its_recording_and_counts_divergence():
    recording = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    oracle = OracleProposer([recording], torch.device("cpu"), acceptance=1.0)
    assert oracle.max_drafts(1, np.array([1, 2, 3]), 4) == 4
    assert oracle._drafts[1].tolist() == [4, 5, 6, 7]
    assert oracle.max_drafts(1, np.array([1, 2, 3, 4, 5, 6, 7]), 4) == 2  # the recording ends
    assert oracle.max_drafts(1, np.array([1, 2, 3, 4, 5, 6, 7, 0]), 4) == 0  # left the recording
    assert oracle.diverged == 1
    assert oracle.max_drafts(1, np.array([1, 2, 3, 4, 5, 6, 7, 0, 1]), 4) == 0  # and stays off it
    assert oracle.diverged == 1
    # Corrupted positions are fixed per recording: two oracles with one seed propose the same drafts.
    a, b = (OracleProposer([recording], torch.device("cpu"), acceptance=0.5, vocab_size=16) for _ in range(2))
    a.max_drafts(1, np.array([1]), 8)
    b.max_drafts(7, np.array([1]), 8)
    assert a._drafts[1].tolist() == b._drafts[7].tolist() != recording[1:]


def test_oracle_forced_result_is_the_verifier_layout_of_the_recording():
    recording = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    oracle = OracleProposer([recording], torch.device("cpu"), acceptance=1.0)
    oracle._drafts_of[0][5] = 0  # the draft for position 5 is wrong
    assert oracle.max_drafts(1, np.array([1, 2, 3]), 4) == 4  # drafts 4, 5, 0, 7
    oracle.propose(None, [SimpleNamespace(seq_id=1, num_drafts=4)])
    tokens, accepted = oracle.forced_result(np.array([0, 4]))  # a sequence without drafts first
    assert tokens.tolist() == [-2, 4, 5, 6, -1, -1] and accepted.tolist() == [-2, 2]
