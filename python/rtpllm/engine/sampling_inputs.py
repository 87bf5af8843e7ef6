"""Glue between the engine's sequence state and the sampler: inputs in, per-token logprobs out."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from rtpllm.layers.sampler import SamplerOutput
from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.outputs import TokenLogprobs


def build_sampling_batch(seqs: Sequence, eos_token_ids: Sequence[int], default_generator: torch.Generator,
                         device: torch.device, vocab_size: int,
                         previous: Optional[SamplingBatch] = None) -> SamplingBatch:
    """One row per sequence sampled this step, in the order of the batch's logits rows.
    `previous` (the last step's batch) lets unchanged per-row values skip their device copy.

    Below `min_tokens`, EOS (unless ignored) and the stop ids are banned, so the sequence cannot end early.
    """
    banned = []
    for seq in seqs:
        params = seq.params
        if len(seq.output_ids) < params.min_tokens:
            banned.append(list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids)))
        else:
            banned.append(None)
    return SamplingBatch.build(
        [seq.params for seq in seqs], [seq.group.prompt_ids for seq in seqs], [seq.output_ids for seq in seqs],
        [seq.generator for seq in seqs], device, default_generator=default_generator,
        banned_token_ids=banned, vocab_size=vocab_size, previous=previous)


def sampled_logprobs(seqs: Sequence, sampled: SamplerOutput) -> dict[int, list[TokenLogprobs]]:
    """seq_id -> [{sampled token: logprob, top-N ids: logprobs}] for the sequences that asked."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return {}
    token_ids = sampled.token_ids[rows].tolist()
    token_logprobs = sampled.logprobs[rows].tolist()
    top_ids = top_values = None
    if sampled.top_logprobs is not None:
        top_ids = sampled.top_logprobs[0][rows].tolist()
        top_values = sampled.top_logprobs[1][rows].tolist()
    result: dict[int, list[TokenLogprobs]] = {}
    for i, row in enumerate(rows):
        seq = seqs[row]
        entry: TokenLogprobs = {token_ids[i]: token_logprobs[i]}
        if top_ids is not None:
            for t, v in zip(top_ids[i][:seq.params.logprobs], top_values[i][:seq.params.logprobs]):
                entry.setdefault(t, v)
        result[seq.seq_id] = [entry]
    return result
