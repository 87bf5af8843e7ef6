"""Every known token of each speculating sequence as one growing numpy array.

Proposers read a sequence's whole context (prompt + outputs) every step. Building that array from
the prompt list and the output list each time costs O(context) per sequence and step (two copies,
at 1K tokens and batch 256 about a millisecond of a ~10 ms GPU step); here each sequence keeps a
buffer with spare room and a step appends only the tokens that arrived since the last one.
"""

from __future__ import annotations

import numpy as np


class TokenHistory:
    def __init__(self):
        self._buffers: dict[int, np.ndarray] = {}
        self._lengths: dict[int, int] = {}

    def tokens(self, seq) -> np.ndarray:
        """int64 view of the sequence's prompt + output tokens. The view stays valid (later tokens
        go past its end, or into a new buffer), so callers may keep it for the step."""
        prompt = seq.group.prompt_ids
        outputs = seq.output_ids
        total = len(prompt) + len(outputs)
        buffer = self._buffers.get(seq.seq_id)
        known = self._lengths.get(seq.seq_id, 0)
        if buffer is None:
            buffer = np.empty(max(2 * total, 64), dtype=np.int64)
            buffer[:len(prompt)] = prompt
            known = len(prompt)
        elif known > total:  # cannot happen (outputs only grow); start over rather than read stale tokens
            return self._restart(seq)
        if total > buffer.shape[0]:
            grown = np.empty(2 * total, dtype=np.int64)
            grown[:known] = buffer[:known]
            buffer = grown
        if total > known:
            start = known - len(prompt)
            buffer[known:total] = outputs[start:] if start else outputs
        self._buffers[seq.seq_id] = buffer
        self._lengths[seq.seq_id] = total
        return buffer[:total]

    def _restart(self, seq) -> np.ndarray:
        self._buffers.pop(seq.seq_id, None)
        self._lengths.pop(seq.seq_id, None)
        return self.tokens(seq)

    def release(self, live_seq_ids: set[int]) -> None:
        for seq_id in [s for s in self._buffers if s not in live_seq_ids]:
            del self._buffers[seq_id]
            del self._lengths[seq_id]
