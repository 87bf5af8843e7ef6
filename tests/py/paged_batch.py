"""A hand-made paged KV cache and step builder for model tests (no scheduler involved).

    kv = PagedKV(arch, num_blocks=64, block_size=4)
    logits = kv.run(model, {0: prompt_a, 1: prompt_b})   # one step; {seq: [new_tokens, vocab]}
    logits = kv.run(model, {0: [next_a], 1: [next_b]})   # a decode step

Block ids are handed out in a scrambled order (block 0 included, so table padding points at a
block that another sequence owns) and the cache starts as NaN, so a backend that reads a slot it
does not own, or skips the causal mask, produces visibly wrong logits.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from rtpllm.layers.attention_metadata import AttentionMetadata


class PagedKV:
    def __init__(self, arch, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0):
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        self.caches = [torch.full(shape, float("nan"), dtype=dtype, device=self.device)
                       for _ in range(arch.num_layers)]
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def build_step(self, new_tokens: dict[int, Sequence[int]]):
        """Appends each sequence's new tokens (in dict order) -> (input_ids, positions, meta)."""
        ids, positions, slots, query_start, seq_lens, computed = [], [], [], [0], [], []
        for seq, tokens in new_tokens.items():
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.block_tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            for pos in range(start, end):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += list(tokens)
            positions += range(start, end)
            query_start.append(query_start[-1] + len(tokens))
            seq_lens.append(end)
            computed.append(start)
            self.lengths[seq] = end
        width = max(len(self.block_tables[seq]) for seq in new_tokens)
        tables = [self.block_tables[seq] + [0] * (width - len(self.block_tables[seq])) for seq in new_tokens]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.int64),
            query_start_loc=as_tensor(query_start, torch.int32),
            seq_lens=as_tensor(seq_lens, torch.int32),
            num_computed=as_tensor(computed, torch.int32),
            block_tables=as_tensor(tables, torch.int32),
            max_query_len=max(len(t) for t in new_tokens.values()),
            max_seq_len=max(seq_lens))
        return as_tensor(ids, torch.int64), as_tensor(list(positions), torch.int64), meta

    @torch.inference_mode()
    def run(self, model, new_tokens: dict[int, Sequence[int]], last_only: bool = False) -> dict[int, torch.Tensor]:
        """One forward step; returns each sequence's logits (float32, CPU) for all of its new tokens,
        or with `last_only` for its last new token only ([1, vocab])."""
        input_ids, positions, meta = self.build_step(new_tokens)
        hidden = model(input_ids, positions, self.caches, meta)
        bounds = meta.query_start_loc.tolist()
        if last_only:
            logits = model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1]).cpu()
            return {seq: logits[i:i + 1] for i, seq in enumerate(new_tokens)}
        logits = model.compute_logits(hidden).cpu()
        return {seq: logits[bounds[i]:bounds[i + 1]] for i, seq in enumerate(new_tokens)}


@torch.inference_mode()
def reference_logits(hf_model, tokens: Sequence[int]) -> torch.Tensor:
    """transformers' logits [len(tokens), vocab] float32 for one sequence."""
    device = next(hf_model.parameters()).device
    out = hf_model(torch.tensor([list(tokens)], device=device))
    return out.logits[0].float().cpu()


def greedy_generate(model, arch, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    block_size: int = 16, device: str | torch.device = "cpu") -> list[list[int]]:
    """Greedy decoding of all prompts together with our model: one batched prefill, then batched
    decode steps. Returns the new tokens of each prompt."""
    blocks_per_seq = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    kv = PagedKV(arch, num_blocks=blocks_per_seq * len(prompts), block_size=block_size,
                 dtype=next(model.parameters()).dtype, device=device)
    step = {i: list(p) for i, p in enumerate(prompts)}
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = kv.run(model, step, last_only=True)
        step = {}
        for seq, rows in logits.items():
            token = int(rows[-1].argmax())
            outputs[seq].append(token)
            step[seq] = [token]
    return outputs
