"""Prompt lookup (n-gram) proposals: if the context's last n tokens appeared before, propose the
tokens that followed them there. No weights, no device work; strong on inputs that quote their
context (summaries, edits, code rewrites)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from rtpllm.spec.proposer import Proposal, Proposer, SpecSequence, to_device

# Only the most recent tokens are searched, so a step's host work stays bounded on long contexts.
_SEARCH_WINDOW = 4096


def find_ngram_continuation(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The up to k tokens that followed the most recent earlier occurrence of the context's last
    n tokens, for the largest n in [min_n, max_n] that occurs. Empty when none occurs.

    One pass over the window finds where the last token occurred before (the only places a match
    can end); the match lengths there are then extended backwards a token at a time, over those
    candidates only: O(window + candidates * max_n) instead of a window scan per n."""
    tokens = tokens[-_SEARCH_WINDOW:]
    length = tokens.shape[0]
    max_n = min(max_n, length - 1)
    if max_n < min_n or min_n < 1:
        return tokens[:0]
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])  # the suffix itself excluded
    if ends.size == 0:
        return tokens[:0]
    matched = np.ones(ends.shape[0], dtype=np.int64)  # suffix tokens matched, ending at each candidate
    alive = np.ones(ends.shape[0], dtype=bool)
    for j in range(1, max_n):
        before = ends - j
        alive &= before >= 0
        alive[alive] = tokens[before[alive]] == tokens[length - 1 - j]
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return tokens[:0]
    start = int(ends[np.flatnonzero(matched >= best)[-1]]) + 1
    return tokens[start:start + k]


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, device: torch.device):
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self.device = device
        self._found: dict[int, np.ndarray] = {}

    def max_drafts(self, seq_id: int, token_ids: np.ndarray, k: int) -> int:
        drafts = find_ngram_continuation(token_ids, self.min_n, self.max_n, k)
        self._found[seq_id] = drafts
        return int(drafts.shape[0])

    def propose(self, batch, seqs: list[SpecSequence]) -> Proposal:
        parts = []
        for seq in seqs:
            found: Optional[np.ndarray] = self._found.pop(seq.seq_id, None)
            if found is None or found.shape[0] < seq.num_drafts:
                found = find_ngram_continuation(seq.token_ids, self.min_n, self.max_n, seq.num_drafts)
            if found.shape[0] < seq.num_drafts:
                raise RuntimeError(f"ngram: sequence {seq.seq_id} got {seq.num_drafts} slots but only "
                                   f"{found.shape[0]} drafts exist")
            parts.append(found[:seq.num_drafts])
        return Proposal(token_ids=to_device(np.concatenate(parts).astype(np.int64), self.device))

    def release(self, live_seq_ids: set[int]) -> None:
        self._found.clear()
