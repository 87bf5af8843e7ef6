"""Verification of drafts against the target's logits, on the device, with no host round trip.

Greedy rows accept the longest run of drafts equal to the target's argmax and then take the
argmax: the output is exactly what decoding without speculation produces. Random rows use
rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d drawn from q is accepted
with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
norm(max(0, p - q)); when every draft is accepted a bonus token is drawn from the last position's
p. Each output token is then distributed exactly as p, the target's distribution after the same
penalties / temperature / top-k / top-p / min-p the sampler applies (a deterministic draft is a
point mass q). Penalties see, at row j, the history plus drafts 0 .. j-1 (spec/penalties.py): the
tokens that precede row j whenever row j's token is emitted.

Rows: every verified position of every sampled sequence (batch.verify_logits_indices), sequence
after sequence; the output holds, per sequence, its accepted drafts, one more token, then -1
(what Scheduler.update takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rtpllm.layers.sampler import argmax_rows, filtered_probs
from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.spec.penalties import draft_prefix_pairs, penalize_verify_rows
from rtpllm.spec.proposer import to_device


@dataclass
class VerifyLayout:
    """Index tensors (device) describing a batch's verified rows."""

    row_seq: torch.Tensor  # int64 [R]: the sampled sequence of each row
    row_pos: torch.Tensor  # int64 [R]: 0 .. k within its sequence
    draft_rows: torch.Tensor  # int64 [D]: rows followed by a draft (row r verifies the draft at r + 1)
    seq_first_row: torch.Tensor  # int64 [S]: each sequence's first row
    seq_drafts: torch.Tensor  # int64 [S]: each sequence's draft count
    # Every row paired with each draft before it (penalties count those drafts): int64 [P] each.
    prefix_rows: torch.Tensor
    prefix_drafts: torch.Tensor  # index into the step's draft ids
    draft_counts: np.ndarray  # host int [S]
    first_rows: np.ndarray  # host int [S]: each sequence's first row (its ordinary sampled position)
    max_rows: int  # largest k + 1

    @property
    def num_rows(self) -> int:
        return int(self.row_seq.shape[0])

    @classmethod
    def build(cls, draft_counts: np.ndarray, device: torch.device) -> "VerifyLayout":
        counts = np.asarray(draft_counts, dtype=np.int64)
        rows_per_seq = counts + 1
        offsets = np.concatenate([[0], np.cumsum(rows_per_seq)])
        row_seq = np.repeat(np.arange(counts.shape[0]), rows_per_seq)
        row_pos = np.arange(offsets[-1]) - offsets[row_seq]
        draft_rows = np.flatnonzero(row_pos < counts[row_seq])
        prefix_rows, prefix_drafts = draft_prefix_pairs(counts)
        parts = [row_seq, row_pos, draft_rows, offsets[:-1], counts, prefix_rows, prefix_drafts]
        packed = to_device(np.concatenate(parts).astype(np.int64), device)  # one copy for all of them
        views = torch.split(packed, [p.shape[0] for p in parts])
        return cls(row_seq=views[0], row_pos=views[1], draft_rows=views[2], seq_first_row=views[3],
                   seq_drafts=views[4], prefix_rows=views[5], prefix_drafts=views[6], draft_counts=counts,
                   first_rows=offsets[:-1], max_rows=int(rows_per_seq.max()) if counts.size else 1)


def draw_uniforms(layout: VerifyLayout, sampling: SamplingBatch, device: torch.device) -> torch.Tensor:
    """float32 [R, 2]: per row, one number for the acceptance test and one for the correction.
    Seeded sequences draw theirs from their own generator, so their stream ignores the batch."""
    uniforms = torch.rand(layout.num_rows, 2, device=device, generator=sampling.default_generator)
    for seq in sampling.seeded_rows:
        if layout.draft_counts[seq] > 0:
            first = int(layout.first_rows[seq])
            uniforms[first:first + int(layout.draft_counts[seq]) + 1].uniform_(generator=sampling.generators[seq])
    return uniforms


def sample_with(probs: torch.Tensor, uniform: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row of `probs` (any per-row scale) with the given uniforms
    [n]; `fallback` where the draw would land on a zero-probability token (scan rounding)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    valid = probs.gather(1, ids).squeeze(1) > 0
    return torch.where(valid, ids.squeeze(1), fallback)


def verify(logits: torch.Tensor, layout: VerifyLayout, sampling: SamplingBatch, draft_ids: torch.Tensor,
           draft_probs: Optional[torch.Tensor], uniforms: Optional[torch.Tensor] = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: float [R, vocab] at the verified rows (raw: penalties are applied here, per row with
    the drafts before it); draft_ids: int64 [D]; draft_probs: float32 [D, vocab] or None (point masses). Returns (tokens int64 [R]: per sequence its accepted drafts,
    one more token, then -1; num_accepted int64 [S])."""
    num_rows = logits.shape[0]
    if sampling.use_penalties:  # each row as decoding would see it: history plus the drafts before it
        logits = penalize_verify_rows(logits, layout, sampling, draft_ids)
    argmax = argmax_rows(logits)
    next_draft = torch.full((num_rows,), -1, dtype=torch.int64, device=logits.device)
    next_draft[layout.draft_rows] = draft_ids
    has_draft = next_draft >= 0
    greedy_accept = has_draft & (next_draft == argmax)
    if sampling.all_greedy:
        accepted, correction = greedy_accept, argmax
    else:
        if uniforms is None:
            uniforms = draw_uniforms(layout, sampling, logits.device)
        p = filtered_probs(logits, sampling, layout.row_seq)
        safe_draft = next_draft.clamp(min=0).unsqueeze(1)
        p_draft = p.gather(1, safe_draft).squeeze(1)
        residual = p.clone()
        q_draft = torch.ones_like(p_draft)
        if draft_probs is None:
            residual[layout.draft_rows, draft_ids] = 0.0  # max(0, p - point mass at the draft)
        else:
            q_draft[layout.draft_rows] = draft_probs.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
            residual[layout.draft_rows] = (p[layout.draft_rows] - draft_probs).clamp_(min=0.0)
        # p == q leaves no residual mass (a rejection then has probability 0): fall back to p.
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(empty, p, residual)
        accept_random = has_draft & (uniforms[:, 0] * q_draft < p_draft)
        row_greedy = sampling.greedy.index_select(0, layout.row_seq)
        accepted = torch.where(row_greedy, greedy_accept, accept_random)
        correction = torch.where(row_greedy, argmax, sample_with(residual, uniforms[:, 1], argmax))
    # The accepted run of each sequence: leading accepted rows.
    grid = torch.zeros(len(layout.draft_counts), layout.max_rows, dtype=torch.int64, device=logits.device)
    grid[layout.row_seq, layout.row_pos] = accepted.long()
    num_accepted = grid.cumprod(dim=1).sum(dim=1)
    m = num_accepted.index_select(0, layout.row_seq)
    tokens = torch.where(layout.row_pos < m, next_draft,
                         torch.where(layout.row_pos == m, correction, torch.full_like(correction, -1)))
    return tokens, num_accepted
