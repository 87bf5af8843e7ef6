"""A proposer that knows the answer: it proposes the target's own continuation, recorded in an
earlier run, corrupting each draft with probability 1 - acceptance. For benchmarks (the speedup
at a controlled acceptance) and tests; not a configurable method."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from rtpllm.spec.proposer import Proposal, Proposer, SpecSequence, to_device


class OracleProposer(Proposer):
    name = "oracle"

    def __init__(self, sequences: Sequence[Sequence[int]], device: torch.device, acceptance: float = 1.0,
                 vocab_size: Optional[int] = None, seed: int = 0):
        """sequences: full token sequences (prompt + the target's output) to draw drafts from."""
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        self.device = device
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)
        self._match: dict[int, Optional[np.ndarray]] = {}
        self._drafts: dict[int, np.ndarray] = {}

    def _recorded(self, seq_id: int, tokens: np.ndarray) -> Optional[np.ndarray]:
        if seq_id not in self._match:
            n = tokens.shape[0]
            self._match[seq_id] = next((s for s in self.sequences if s.shape[0] > n and np.array_equal(s[:n], tokens)),
                                       None)
        return self._match[seq_id]

    def max_drafts(self, seq_id: int, token_ids: np.ndarray, k: int) -> int:
        full = self._recorded(seq_id, token_ids)
        n = token_ids.shape[0]
        if full is None or not np.array_equal(full[:n], token_ids):
            return 0
        drafts = full[n:n + k].copy()
        wrong = self._rng.random(drafts.shape[0]) >= self.acceptance
        if wrong.any():
            drafts[wrong] = (drafts[wrong] + 1) % (self.vocab_size or int(full.max()) + 2)
        self._drafts[seq_id] = drafts
        return int(drafts.shape[0])

    def propose(self, batch, seqs: list[SpecSequence]) -> Proposal:
        drafts = np.concatenate([self._drafts.pop(s.seq_id)[:s.num_drafts] for s in seqs])
        return Proposal(token_ids=to_device(drafts, self.device))

    def release(self, live_seq_ids: set[int]) -> None:
        self._drafts.clear()
        for seq_id in [s for s in self._match if s not in live_seq_ids]:
            del self._match[seq_id]
