"""Logprobs of the tokens a speculative step emits, for the sequences that asked for them.

A speculating sequence emits its accepted drafts and one more token, each from a verified row
whose logits the target computed in the step. Logprobs are those of the raw logits (before
temperature and filters, as the sampler reports them), so they do not depend on how a token was
chosen: row j's logprob of the token emitted at j is what decoding without speculation reports.
They travel to the host inside the step's one copy (float64 bit patterns in the int64 tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rtpllm.layers.sampler import gather_logprobs
from rtpllm.outputs import TokenLogprobs
from rtpllm.spec.proposer import to_device


@dataclass
class LogprobRows:
    seqs: list[int]  # indices (among the sampled sequences) of those with logprobs, in order
    rows: np.ndarray  # int64: their verified rows, sequence after sequence
    rows_per_seq: list[int]  # how many of `rows` each of them has (its drafts + 1)
    num_top: int  # the largest top-N asked

    @classmethod
    def find(cls, sampled_seqs: list, draft_counts: np.ndarray) -> Optional["LogprobRows"]:
        seqs = [i for i, seq in enumerate(sampled_seqs) if seq.params.logprobs is not None]
        if not seqs:
            return None
        rows_per_seq = draft_counts.astype(np.int64) + 1
        row_seq = np.repeat(np.arange(rows_per_seq.shape[0]), rows_per_seq)
        rows = np.flatnonzero(np.isin(row_seq, seqs))
        return cls(seqs, rows, rows_per_seq[seqs].tolist(), max(sampled_seqs[i].params.logprobs for i in seqs))

    def on_device(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """int64 tensors to append to the step's copy: logprobs [n], then top ids and values [n, N]."""
        rows = to_device(self.rows, logits.device)
        emitted = tokens.index_select(0, rows).clamp(min=0)  # -1 (not emitted) rows are dropped later
        values, top = gather_logprobs(logits.index_select(0, rows).float(), emitted, self.num_top or None)
        parts = [values.double().view(torch.int64)]
        if top is not None:
            parts += [top[0].flatten(), top[1].double().view(torch.int64).flatten()]
        return parts

    def entries(self, packed: np.ndarray, sampled_seqs: list, tokens: np.ndarray, num_emitted: np.ndarray
                ) -> dict[int, list[TokenLogprobs]]:
        """seq_id -> one entry per emitted token, from the host copy of `on_device`'s tensors."""
        n = self.rows.shape[0]
        values = packed[:n].view(np.float64)
        top_ids = top_values = None
        if self.num_top:
            top_ids = packed[n:n + n * self.num_top].reshape(n, self.num_top)
            top_values = packed[n + n * self.num_top:].view(np.float64).reshape(n, self.num_top)
        result: dict[int, list[TokenLogprobs]] = {}
        cursor = 0
        for seq_index, num_rows in zip(self.seqs, self.rows_per_seq):
            seq = sampled_seqs[seq_index]
            first = int(self.rows[cursor])
            want = seq.params.logprobs
            out = []
            for j in range(int(num_emitted[seq_index])):
                entry: TokenLogprobs = {int(tokens[first + j]): float(values[cursor + j])}
                if want:
                    for t, v in zip(top_ids[cursor + j, :want].tolist(), top_values[cursor + j, :want].tolist()):
                        entry.setdefault(t, v)
                out.append(entry)
            result[seq.seq_id] = out
            cursor += num_rows
        return result
