"""Prompt logprobs: the log-probability of each prompt token given the tokens before it.

They come from the logits of every prompt position, which a normal step does not compute, so the
engine marks the sequences that asked for them and collects their rows chunk by chunk.
"""

from __future__ import annotations

import torch

from rtpllm.outputs import TokenLogprobs


class PromptLogprobCollector:
    def __init__(self, batch, seqs: dict):
        self._batch = batch
        self._targets = []  # (batch index, sequence state)
        num_computed = batch.num_computed
        for index, seq_id in enumerate(batch.request_ids.tolist()):
            seq = seqs[seq_id]
            group = seq.group
            # Only the first sample of a request reports them, and only while its prompt is being read.
            if (group.prompt_logprobs is not None and seq.index == 0
                    and int(num_computed[index]) < len(group.prompt_ids) - 1):
                self._targets.append((index, seq))

    @property
    def seq_indices(self) -> list[int]:
        return [index for index, _ in self._targets]

    def collect(self, rows_by_seq: dict[int, torch.Tensor]) -> None:
        starts = self._batch.query_start_loc
        for index, seq in self._targets:
            group = seq.group
            logprobs = rows_by_seq[index].float().cpu()
            first_pos = int(self._batch.num_computed[index])
            count = int(starts[index + 1]) - int(starts[index])
            top_n = group.params.prompt_logprobs
            for j in range(count):
                target_pos = first_pos + j + 1  # row j predicts the token after position first_pos + j
                if target_pos >= len(group.prompt_ids):
                    break
                if target_pos != len(group.prompt_logprobs):
                    continue  # already collected before a preemption made this chunk run again
                group.prompt_logprobs.append(_entry(logprobs[j], group.prompt_ids[target_pos], top_n))


def _entry(row: torch.Tensor, token: int, top_n: int) -> TokenLogprobs:
    entry: TokenLogprobs = {token: float(row[token])}
    if top_n:
        values, ids = torch.topk(row, top_n)
        for t, v in zip(ids.tolist(), values.tolist()):
            entry.setdefault(t, v)
    return entry
