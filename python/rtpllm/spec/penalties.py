"""Repetition / presence / frequency penalties at speculative positions, on the device.

A sequence's distribution at draft position j depends on the tokens before it, drafts included:
verify row j of a sequence must be penalised with its history (prompt + output, as the sampler
does) plus drafts 0 .. j-1, as if those had been accepted. Where row j is reached at all, they
were accepted, so each emitted token is drawn from exactly the distribution decoding without
speculation would use; greedy rows take the argmax of the same penalised logits.

Everything is expressed as (row, token) pairs over the rows being penalised, as the sampler's
`apply_penalties` does for one row per sequence, so the cost follows the history's length times
the rows, never rows x vocab except for one dense count buffer. Pairs that belong to no real row
(a sequence's history expanded past its own drafts, a draft-model sequence that is not drafting
this step) go to one scratch row after the real ones, whose result is dropped: no host sync and
no boolean masking is needed to discard them.

Penalty semantics (layers/sampler.apply_penalties): repetition divides positive / multiplies
negative logits of every token seen in prompt + output; presence subtracts its value once per
token seen in the output; frequency subtracts its value times the token's count in the output.
Drafts count as output.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.spec.proposer import to_device


def penalize_rows(logits: torch.Tensor, repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                  seen: Optional[tuple[torch.Tensor, torch.Tensor]],
                  counted: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """logits [n, vocab] (any float dtype; not modified) -> penalised float32 [n, vocab].

    repetition / presence / frequency: float32 [n], each row's penalties (1, 0, 0 = none).
    seen: (rows, tokens) int64 pairs of the tokens each row has seen (prompt, output, drafts) for
    the repetition penalty; counted: the same for the tokens counted as output (presence,
    frequency), repeats counted. A pair whose row is n goes to a scratch row and is dropped."""
    n, vocab = logits.shape
    work = torch.empty(n + 1, vocab, dtype=torch.float32, device=logits.device)
    work[:n].copy_(logits)
    work[n].zero_()
    flat = work.view(-1)
    if seen is not None and seen[0].numel():
        index = seen[0] * vocab + seen[1]
        rep = _with_neutral(repetition, 1.0).index_select(0, seen[0])
        # A token seen several times appears at several indices: every copy computes the same new
        # value from the same old one, so the scattered writes agree.
        values = flat[index]
        flat[index] = torch.where(values > 0, values / rep, values * rep)
    if counted is not None and counted[0].numel():
        index = counted[0] * vocab + counted[1]
        # Integer-valued float adds are exact in any order: deterministic on the GPU as well.
        counts = torch.zeros_like(flat).index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
        rows = counted[0]
        penalty = (_with_neutral(presence, 0.0).index_select(0, rows)
                   + _with_neutral(frequency, 0.0).index_select(0, rows) * counts[index])
        flat[index] = flat[index] - penalty
    return work[:n]


def _with_neutral(values: torch.Tensor, neutral: float) -> torch.Tensor:
    """values [n] plus the scratch row's neutral value at index n."""
    return torch.cat([values, values.new_full((1,), neutral)])


# ---------------------------------------------------------------------------- verify rows
def draft_prefix_pairs(draft_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host index arrays (row, draft index) pairing every verify row with each draft before it:
    row j of a sequence with drafts d_0 .. d_{k-1} gets d_0 .. d_{j-1}. Drafts are numbered in the
    proposal's order (sequence after sequence); rows in the verifier's layout. Sum k(k+1)/2 pairs."""
    counts = np.asarray(draft_counts, dtype=np.int64)
    rows_per_seq = counts + 1
    row_offsets = np.concatenate([[0], np.cumsum(rows_per_seq)])
    row_seq = np.repeat(np.arange(counts.shape[0]), rows_per_seq)
    row_pos = np.arange(row_offsets[-1]) - row_offsets[row_seq]
    rows = np.repeat(np.arange(row_pos.shape[0]), row_pos)
    earlier = np.arange(rows.shape[0]) - np.repeat(np.cumsum(row_pos) - row_pos, row_pos)
    draft_offsets = np.cumsum(counts) - counts
    return rows, draft_offsets[row_seq[rows]] + earlier


def penalize_verify_rows(logits: torch.Tensor, layout, sampling: SamplingBatch, draft_ids: torch.Tensor
                         ) -> torch.Tensor:
    """The verified rows' logits [R, vocab] penalised as decoding would at each position (history
    plus the drafts before it); float32. `layout` is the step's verifier.VerifyLayout, whose rows
    map to `sampling`'s rows (one per sampled sequence) by layout.row_seq."""
    num_rows = logits.shape[0]
    drafts_before = draft_ids.index_select(0, layout.prefix_drafts)
    seen = counted = None
    if sampling.repetition_tokens is not None:
        seen = _cat(_expand_history(sampling.repetition_tokens, layout, num_rows), (layout.prefix_rows, drafts_before))
    if sampling.output_tokens is not None:
        counted = _cat(_expand_history(sampling.output_tokens, layout, num_rows), (layout.prefix_rows, drafts_before))
    return penalize_rows(logits, sampling.repetition_penalty.index_select(0, layout.row_seq),
                         sampling.presence_penalty.index_select(0, layout.row_seq),
                         sampling.frequency_penalty.index_select(0, layout.row_seq), seen, counted)


def _expand_history(pairs: torch.Tensor, layout, scratch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, token) pairs [2, H] -> (row, token) pairs for every verify row of the sequence:
    H x max_rows pairs, those past a sequence's own rows sent to the scratch row."""
    seq, token = pairs[0], pairs[1]
    pos = torch.arange(layout.max_rows, device=pairs.device)
    rows = layout.seq_first_row.index_select(0, seq).unsqueeze(1) + pos
    rows = torch.where(pos <= layout.seq_drafts.index_select(0, seq).unsqueeze(1), rows, scratch)
    return rows.reshape(-1), token.unsqueeze(1).expand(-1, layout.max_rows).reshape(-1)


def _cat(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


# ---------------------------------------------------------------------------- draft side
class DraftPenalties:
    """The same penalised view for a draft model's (or EAGLE head's) own steps: at draft step j a
    sequence's logits are penalised with its history and its drafts 0 .. j-1. Optional for
    correctness (the verifier is told the distribution q each draft was drawn from, whatever it
    is) but it keeps the drafts close to what the penalised target picks."""

    def __init__(self, seqs: Sequence, device: torch.device):
        self.device = device
        self.num_seqs = len(seqs)
        params = [seq.params for seq in seqs]
        self.repetition = to_device(np.asarray([p.repetition_penalty for p in params], dtype=np.float32), device)
        self.presence = to_device(np.asarray([p.presence_penalty for p in params], dtype=np.float32), device)
        self.frequency = to_device(np.asarray([p.frequency_penalty for p in params], dtype=np.float32), device)
        self.num_drafts = np.asarray([seq.num_drafts for seq in seqs], dtype=np.int64)
        # History pairs (sequence, token), host side: a step keeps those of its drafting sequences.
        seen = [seq.token_ids if p.repetition_penalty != 1.0 else seq.token_ids[:0] for seq, p in zip(seqs, params)]
        counted = [seq.token_ids[seq.num_prompt_tokens:] if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                   else seq.token_ids[:0] for seq, p in zip(seqs, params)]
        self._seen = _device_pairs(seen, device)
        self._counted = _device_pairs(counted, device)
        self._drafted = torch.zeros(self.num_seqs, max(int(self.num_drafts.max()), 1), dtype=torch.int64,
                                    device=device)
        self._step = 0

    @classmethod
    def build(cls, seqs: Sequence, device: torch.device) -> Optional["DraftPenalties"]:
        if not any(seq.params.repetition_penalty != 1.0 or seq.params.presence_penalty != 0.0
                   or seq.params.frequency_penalty != 0.0 for seq in seqs):
            return None
        return cls(seqs, device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the current draft step, one row per sequence still drafting (those with more
        than `step` drafts, in order) -> penalised float32."""
        active = np.flatnonzero(self.num_drafts > self._step)
        row_of_seq = np.full(self.num_seqs, active.shape[0], dtype=np.int64)  # not drafting: scratch
        row_of_seq[active] = np.arange(active.shape[0])
        index = to_device(np.concatenate([row_of_seq, active]), self.device)
        row_of_seq_dev, active_dev = index[:self.num_seqs], index[self.num_seqs:]
        drafted = self._drafted.index_select(0, active_dev)[:, :self._step]  # [A, step]
        own = (torch.arange(active.shape[0], device=self.device).repeat_interleave(self._step), drafted.reshape(-1))
        seen = counted = None
        if self._seen is not None:
            seen = _cat((row_of_seq_dev.index_select(0, self._seen[0]), self._seen[1]), own)
        if self._counted is not None:
            counted = _cat((row_of_seq_dev.index_select(0, self._counted[0]), self._counted[1]), own)
        return penalize_rows(logits, self.repetition.index_select(0, active_dev),
                             self.presence.index_select(0, active_dev), self.frequency.index_select(0, active_dev),
                             seen, counted)

    def record(self, drafts: torch.Tensor) -> None:
        """The drafts just drawn for the sequences still drafting (in order); advances the step."""
        active = np.flatnonzero(self.num_drafts > self._step)
        self._drafted[to_device(active, self.device), self._step] = drafts
        self._step += 1


def _device_pairs(token_lists: list[np.ndarray], device: torch.device
                  ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence, its token ids -> (sequence, token) int64 pairs on the device, in one copy."""
    lengths = np.asarray([t.shape[0] for t in token_lists], dtype=np.int64)
    if not lengths.sum():
        return None
    packed = np.stack([np.repeat(np.arange(len(token_lists)), lengths),
                       np.concatenate(token_lists).astype(np.int64)])
    pairs = to_device(packed, device)
    return pairs[0], pairs[1]
