"""The reference attention backend: plain torch over the paged KV cache, on any device.

One step may mix sequences in prefill, in a later prefill chunk and in decode. The backend
writes the step's K/V into the cache at `slot_mapping`, then gathers every sequence's whole
context back through its block table and runs one masked, batched attention: each sequence's
new tokens are padded to `max_query_len` rows and its context to `max_seq_len` columns. A new
token at position p sees context positions 0..p of its own sequence (p = num_computed + its
index among the sequence's new tokens). Cost is O(num_seqs * max_query_len * max_seq_len), so
this is a correctness reference and a CPU fallback, not the fast path.

In a mixed step the decodes at the front (`meta.num_decodes`) attend apart from the prompt
chunks: padded together, every decode would carry max_query_len query rows (a step admitting
32-token prompts beside 500 decodes did 32x the decodes' attention work). On the CPU the decodes
are also cut into buckets of similar context length (`attention_parts`).

The index tensors of that layout depend only on the step, so the first layer builds them and
the others reuse them: an AttentionMetadata is treated as immutable once its step has started.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F

from rtpllm.layers.attention_metadata import AttentionMetadata
from rtpllm.layers.rotary import RotaryEmbedding


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]; k, v [T, num_kv_heads, head_dim];
    slot_mapping int64 [T] (block_id * block_size + offset)."""
    if not kv_cache.is_contiguous():
        # Flattening a non-contiguous cache would copy it, and the write would be lost.
        raise ValueError("kv_cache: must be contiguous")
    k_slots = kv_cache[0].flatten(0, 1)  # [num_blocks * block_size, num_kv_heads, head_dim], a view
    v_slots = kv_cache[1].flatten(0, 1)
    k_slots.index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    v_slots.index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


@dataclass
class StepLayout:
    """Where the step's tokens and contexts sit in the padded batch; the same for every layer."""

    padded_row: torch.Tensor  # int64 [num_tokens]: row of each new token in [num_seqs * max_query_len]
    context_slots: torch.Tensor  # int64 [num_seqs, max_seq_len]: cache slot of each context position
    padding: torch.Tensor  # int64: flat indices into [num_seqs * max_seq_len] of positions >= seq_len
    # bool [num_seqs, 1, max_query_len * group, max_seq_len]: who may attend to whom, one row per
    # (new token, query head of a KV head's group); a single row (decodes) broadcasts instead.
    mask: torch.Tensor


def step_layout(meta: AttentionMetadata, block_size: int, num_tokens: int, group: int = 1) -> StepLayout:
    """`group`: query heads per KV head."""
    device = meta.slot_mapping.device
    query_start = meta.query_start_loc.long()
    token_seq = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device),
                                        query_start[1:] - query_start[:-1], output_size=num_tokens)
    token_row = torch.arange(num_tokens, device=device) - query_start[token_seq]
    num_blocks_needed = -(-meta.max_seq_len // block_size)
    block_ids = meta.block_tables[:, :num_blocks_needed].long()
    offsets = torch.arange(block_size, device=device)
    context_slots = (block_ids.unsqueeze(-1) * block_size + offsets).flatten(1)[:, :meta.max_seq_len]
    key_positions = torch.arange(meta.max_seq_len, device=device)
    valid = key_positions < meta.seq_lens.unsqueeze(1)
    query_positions = meta.num_computed.long().unsqueeze(1) + torch.arange(meta.max_query_len, device=device)
    # Causal within the sequence's own context. Padding rows (past a sequence's new tokens) still
    # see at least position 0, so no softmax row is empty and nothing turns NaN.
    mask = (key_positions <= query_positions.unsqueeze(-1)) & valid.unsqueeze(1)
    if meta.max_query_len > 1:
        mask = mask.repeat_interleave(group, dim=1)
    padding = torch.nonzero(~valid.flatten()).flatten()
    return StepLayout(token_seq * meta.max_query_len + token_row, context_slots, padding, mask.unsqueeze(1))


def gather_context(kv_cache: torch.Tensor, layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's K and V at context positions 0..max_seq_len-1 through its block table,
    [num_seqs, max_seq_len, num_kv_heads, head_dim] each.

    Positions past a sequence's length are zeroed: their slots belong to padding block 0 or to
    other sequences and may hold anything, NaN included, and a NaN value would poison the output
    even under a zero attention weight.
    """
    slots = layout.context_slots.flatten()
    shape = (*layout.context_slots.shape, *kv_cache.shape[3:])
    # NOTE: index_select, not advanced indexing: on the CPU the latter is ~1000x slower here. The
    # padding rows are zeroed by index (a masked torch.where over every row took ~2x as long).
    k = kv_cache[0].flatten(0, 1).index_select(0, slots).index_fill_(0, layout.padding, 0)
    v = kv_cache[1].flatten(0, 1).index_select(0, slots).index_fill_(0, layout.padding, 0)
    return k.view(shape), v.view(shape)


# Decodes per length bucket on the CPU: fewer and each padded row costs as much as a real one;
# more and the per-call overhead (layout, gather, SDPA launch) dominates.
_MIN_BUCKET = 64
_MAX_BUCKETS = 4

Tokens = Union[slice, torch.Tensor]  # a range of the step's tokens, or their indices


def _length_buckets(lengths: torch.Tensor) -> Optional[list[torch.Tensor]]:
    """Indices of `lengths` sorted and cut into the fewest equal-count buckets whose padding
    stays within 10% of the real context; None when one bucket already does (or too few)."""
    d = lengths.numel()
    if d < 2 * _MIN_BUCKET:
        return None
    ordered, order = torch.sort(lengths)
    real = int(ordered.sum())
    if d * int(ordered[-1]) <= 1.1 * real:
        return None
    for count in range(2, min(_MAX_BUCKETS, d // _MIN_BUCKET) + 1):
        cuts = torch.tensor_split(torch.arange(d), count)
        if sum(len(c) * int(ordered[c[-1]]) for c in cuts) <= 1.1 * real:
            break
    return list(torch.tensor_split(order, count))


def attention_parts(meta: AttentionMetadata) -> list[tuple[Tokens, AttentionMetadata]]:
    """The step as (tokens, metadata) parts that attend apart: the leading decodes apart from
    the prompt chunks behind them, and on the CPU the decodes sorted by context length into
    buckets, each padded only to its own longest context (requests that arrived over time, as a
    server's do, differ in length by as many steps as their arrivals were apart)."""
    d = meta.num_decodes or (meta.num_seqs if meta.max_query_len == 1 else 0)
    if d == 0:
        return [(slice(None), meta)]
    buckets = _length_buckets(meta.seq_lens[:d]) if meta.seq_lens.device.type == "cpu" else None
    if buckets is None and d == meta.num_seqs:
        return [(slice(None), meta)]  # a decode step that needs no buckets
    parts: list[tuple[Tokens, AttentionMetadata]] = []
    if buckets is not None:
        lengths = meta.seq_lens[:d]
        for idx in buckets:
            parts.append((idx, replace(
                meta, slot_mapping=meta.slot_mapping[idx], query_start_loc=torch.arange(
                    len(idx) + 1, dtype=meta.query_start_loc.dtype), seq_lens=lengths[idx],
                num_computed=meta.num_computed[idx], block_tables=meta.block_tables[idx], max_query_len=1,
                max_seq_len=int(lengths[idx[-1]]), num_decodes=len(idx), decode_max_seq_len=0, plan=None)))
    else:
        max_len = meta.decode_max_seq_len if meta.num_decodes else meta.max_seq_len
        parts.append((slice(0, d), replace(
            meta, slot_mapping=meta.slot_mapping[:d], query_start_loc=meta.query_start_loc[:d + 1],
            seq_lens=meta.seq_lens[:d], num_computed=meta.num_computed[:d], block_tables=meta.block_tables[:d],
            max_query_len=1, max_seq_len=max_len, num_decodes=d, plan=None)))
    if d < meta.num_seqs:
        # The rest keeps the step's max_seq_len (its own is not known on the host): only padding.
        parts.append((slice(d, None), replace(
            meta, slot_mapping=meta.slot_mapping[d:], query_start_loc=meta.query_start_loc[d:] - d,
            seq_lens=meta.seq_lens[d:], num_computed=meta.num_computed[d:], block_tables=meta.block_tables[d:],
            num_decodes=0, decode_max_seq_len=0, plan=None)))
    return parts


class TorchAttentionBackend:
    """AttentionBackend in plain torch; exact in float32 (up to summation order)."""

    def __init__(self) -> None:
        # The layouts of the step being run, built by its first layer and reused by the others.
        self._layouts: Optional[tuple[AttentionMetadata, list[tuple[Tokens, AttentionMetadata, StepLayout]]]] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                rotary: RotaryEmbedding, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        q, k = rotary(positions, q, k)
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)

        if self._layouts is None or self._layouts[0] is not meta:
            group = q.shape[1] // kv_cache.shape[3]
            parts = [(tokens, part, step_layout(part, kv_cache.shape[2], q[tokens].shape[0], group))
                     for tokens, part in attention_parts(meta)]
            self._layouts = (meta, parts)
        parts = self._layouts[1]
        if len(parts) == 1 and parts[0][0] == slice(None):
            return self._attend(q, kv_cache, parts[0][1], parts[0][2], scale)
        out = torch.empty_like(q)
        for tokens, part, layout in parts:
            if isinstance(tokens, slice):
                out[tokens] = self._attend(q[tokens], kv_cache, part, layout, scale)
            else:
                out.index_copy_(0, tokens, self._attend(q.index_select(0, tokens), kv_cache, part, layout, scale))
        return out

    @staticmethod
    def _attend(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, layout: StepLayout,
                scale: float) -> torch.Tensor:
        num_heads, head_dim = q.shape[1:]
        num_seqs, q_len, kv_heads = meta.num_seqs, meta.max_query_len, kv_cache.shape[3]
        group = num_heads // kv_heads
        q_padded = q.new_zeros(num_seqs * q_len, num_heads, head_dim)
        q_padded.index_copy_(0, layout.padded_row, q)
        # A KV head's query heads attend as extra query rows of that head ([seqs, kv_heads,
        # q_len * group, dim]): SDPA's own GQA path repeats K and V per query head (~1.4x slower).
        q_rows = (q_padded.view(num_seqs, q_len, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
                  .reshape(num_seqs, kv_heads, q_len * group, head_dim))
        k_ctx, v_ctx = gather_context(kv_cache, layout)
        out = F.scaled_dot_product_attention(q_rows, k_ctx.to(q.dtype).transpose(1, 2),
                                             v_ctx.to(q.dtype).transpose(1, 2), attn_mask=layout.mask, scale=scale)
        out = out.view(num_seqs, kv_heads, q_len, group, head_dim).permute(0, 2, 1, 3, 4)
        return out.reshape(num_seqs * q_len, num_heads, head_dim).index_select(0, layout.padded_row)
