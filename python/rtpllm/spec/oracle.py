"""A proposer that knows the answer: it proposes the target's own continuation, recorded in an
earlier run, with a fixed set of positions corrupted (each with probability 1 - acceptance). For
benchmarks (the speedup at a controlled acceptance) and tests; not a configurable method.

A recording is followed only while the sequence's tokens equal it: once they differ (the target
chose another token than in the recorded run: in bf16 a near-tie can break the other way when the
verify step computes the logits of k + 1 rows instead of one), the sequence gets no drafts any
more and counts in `diverged`. The benchmark records again from such a run (bench_spec.py).
The corrupted positions are drawn once per recording, so a run repeats exactly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from rtpllm.spec.proposer import Proposal, Proposer, SpecSequence, to_device


class _Follow:
    """Where a sequence stands in its recording."""

    __slots__ = ("recording", "checked")

    def __init__(self, recording: int, checked: int):
        self.recording = recording  # index into sequences; -1: none matches (no drafts)
        self.checked = checked  # leading tokens known to equal the recording


class OracleProposer(Proposer):
    name = "oracle"

    def __init__(self, sequences: Sequence[Sequence[int]], device: torch.device, acceptance: float = 1.0,
                 vocab_size: Optional[int] = None, seed: int = 0):
        """sequences: full token sequences (prompt + the target's output) to draw drafts from."""
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        self.device = device
        self.acceptance = acceptance
        rng = np.random.default_rng(seed)
        # The draft proposed for position p of recording r: the recorded token, or a wrong one.
        self._drafts_of = []
        for s in self.sequences:
            drafts = s.copy()
            wrong = rng.random(s.shape[0]) >= acceptance
            drafts[wrong] = (drafts[wrong] + 1) % (vocab_size or int(s.max(initial=0)) + 2)
            self._drafts_of.append(drafts)
        self._follow: dict[int, _Follow] = {}
        self._drafts: dict[int, np.ndarray] = {}
        self._truth: dict[int, np.ndarray] = {}  # the recorded tokens at the drafts' positions and one more
        self._step: list[tuple[np.ndarray, np.ndarray]] = []  # (drafts, truth) of the last propose()
        self.diverged = 0  # sequences whose tokens left their recording

    def _position(self, seq_id: int, tokens: np.ndarray) -> Optional[_Follow]:
        """The sequence's place in its recording, checking only the tokens new since the last call."""
        n = tokens.shape[0]
        follow = self._follow.get(seq_id)
        if follow is None:
            match = next((i for i, s in enumerate(self.sequences) if s.shape[0] > n and np.array_equal(s[:n], tokens)),
                         -1)
            follow = self._follow[seq_id] = _Follow(match, n)
        if follow.recording < 0:
            return None
        full = self.sequences[follow.recording]
        if n > follow.checked:
            if n >= full.shape[0] or not np.array_equal(full[follow.checked:n], tokens[follow.checked:n]):
                follow.recording = -1
                self.diverged += n < full.shape[0]
                return None
            follow.checked = n
        return follow

    def max_drafts(self, seq_id: int, token_ids: np.ndarray, k: int) -> int:
        follow = self._position(seq_id, token_ids)
        if follow is None:
            return 0
        n = token_ids.shape[0]
        drafts = self._drafts_of[follow.recording][n:n + k]
        self._drafts[seq_id] = drafts
        self._truth[seq_id] = self.sequences[follow.recording][n:n + k + 1]
        return int(drafts.shape[0])

    def propose(self, batch, seqs: list[SpecSequence]) -> Proposal:
        self._step = [(self._drafts.pop(s.seq_id)[:s.num_drafts], self._truth.pop(s.seq_id)[:s.num_drafts + 1])
                      for s in seqs]
        return Proposal(token_ids=to_device(np.concatenate([d for d, _ in self._step]), self.device))

    def forced_result(self, draft_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What verification would give if the target always chose the recorded token, for the last
        propose(): (tokens int64 [rows], num_accepted int64 [sequences]) in the verifier's layout,
        -2 where the real result stands (sequences without drafts, or past the recording's end).
        For timing runs only (bench_spec.py): the device still verifies, its answer is replaced."""
        rows = int(np.sum(draft_counts) + draft_counts.shape[0])
        tokens = np.full(rows, -2, dtype=np.int64)
        accepted = np.full(draft_counts.shape[0], -2, dtype=np.int64)
        step = iter(self._step)
        row = 0
        for i, k in enumerate(draft_counts.tolist()):
            if k > 0:
                drafts, truth = next(step)
                if truth.shape[0] == k + 1:
                    wrong = np.flatnonzero(drafts != truth[:k])
                    m = int(wrong[0]) if wrong.size else k
                    tokens[row:row + k + 1] = -1
                    tokens[row:row + m + 1] = truth[:m + 1]
                    accepted[i] = m
            row += k + 1
        return tokens, accepted

    def release(self, live_seq_ids: set[int]) -> None:
        self._drafts.clear()
        self._truth.clear()
        for seq_id in [s for s in self._follow if s not in live_seq_ids]:
            del self._follow[seq_id]
