"""Drives `rtpllm._C.Scheduler` with a fake model that checks every KV read.

The "KV" of a token is a fingerprint of its whole context: fp(p) = mix(fp(p - 1), token p), with
fp(p - 1) read back from the paged cache through the batch's block table, as attention would. A
wrong block table, slot mapping or prefix-cache hit makes the read-back differ from the reference
computed from the request's true tokens. The sampled token is derived from the fingerprint, so
outputs depend only on the token context: preemption, chunking and prefix sharing can't change them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from rtpllm import _C

_MASK = (1 << 64) - 1


def _mix(a: int, b: int) -> int:
    x = ((a * 0x9E3779B97F4A7C15) ^ (b + 0x632BE59BD9B4E019 + (a << 6) + (a >> 2))) & _MASK
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    return x ^ (x >> 29)


class FakeKVModel:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int):
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.cache: list[int | None] = [None] * (num_blocks * block_size)
        self.tokens: dict[int, list[int]] = {}
        self._seeds: dict[int, int] = {}
        self._reference: dict[int, list[int]] = {}

    def add_request(self, request_id: int, prompt: list[int], extra_key: int = 0) -> None:
        self.tokens[request_id] = list(prompt)
        self._seeds[request_id] = _mix(extra_key, 0x5BD1E995)
        self._reference[request_id] = []

    def reference(self, request_id: int, pos: int) -> int:
        ref, tokens = self._reference[request_id], self.tokens[request_id]
        while len(ref) <= pos:
            prev = ref[-1] if ref else self._seeds[request_id]
            ref.append(_mix(prev, tokens[len(ref)]))
        return ref[pos]

    def run(self, batch) -> np.ndarray:
        """Checks the batch, writes its tokens' KV, returns one sampled token per logits index."""
        bs = self.block_size
        ids, qsl = batch.request_ids.tolist(), batch.query_start_loc.tolist()
        computed, seq_lens = batch.num_computed.tolist(), batch.seq_lens.tolist()
        tables, inputs = batch.block_tables.tolist(), batch.input_token_ids.tolist()
        positions, slots = batch.positions.tolist(), batch.slot_mapping.tolist()
        logits_indices, sampled_ids = batch.logits_indices.tolist(), batch.sampled_request_ids.tolist()
        assert qsl[0] == 0 and qsl[-1] == batch.num_tokens == len(inputs)
        sampled = []
        for i, rid in enumerate(ids):
            tokens, row = self.tokens[rid], tables[i]
            start, end = computed[i], seq_lens[i]
            assert end - start == qsl[i + 1] - qsl[i] > 0
            for pos in range(start):  # attention reads the whole cached context
                assert self.cache[row[pos // bs] * bs + pos % bs] == self.reference(rid, pos), \
                    f"request {rid} reads wrong KV at position {pos}"
            fp = self.cache[row[(start - 1) // bs] * bs + (start - 1) % bs] if start else self._seeds[rid]
            for t in range(qsl[i], qsl[i + 1]):
                pos = positions[t]
                assert pos == start + t - qsl[i] and inputs[t] == tokens[pos]
                assert slots[t] == row[pos // bs] * bs + pos % bs
                fp = _mix(fp, inputs[t])
                self.cache[slots[t]] = fp
            if end == len(tokens):
                k = len(sampled)
                assert sampled_ids[k] == rid and logits_indices[k] == qsl[i + 1] - 1
                sampled.append(fp % self.vocab_size)
        assert len(sampled) == batch.num_sampled
        return np.asarray(sampled, dtype=np.int32)


class Driver:
    """schedule() -> FakeKVModel -> update(), recording every request's outputs."""

    def __init__(self, *, max_num_batched_tokens=64, max_num_seqs=8, enable_chunked_prefill=True, max_model_len=256,
                 num_blocks=64, block_size=4, enable_prefix_caching=True, vocab_size=1000):
        self.scheduler = _C.Scheduler(
            _C.SchedulerOptions(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len),
            _C.CacheOptions(num_blocks=num_blocks, block_size=block_size,
                            enable_prefix_caching=enable_prefix_caching))
        self.model = FakeKVModel(num_blocks, block_size, vocab_size)
        self.generated: dict[int, list[int]] = defaultdict(list)
        self.finished: dict[int, "_C.FinishReason"] = {}

    def add(self, request_id: int, prompt: list[int], **spec) -> None:
        spec.setdefault("arrival_time", float(request_id))
        self.scheduler.add_request(_C.RequestSpec(request_id=request_id, prompt_token_ids=prompt, **spec))
        self.model.add_request(request_id, prompt, spec.get("extra_key", 0))

    def apply(self, batch, sampled) -> list:
        outputs = self.scheduler.update(batch, sampled)
        for out in outputs:
            self.model.tokens[out.request_id].extend(out.new_token_ids)
            self.generated[out.request_id].extend(out.new_token_ids)
            if out.finished:
                self.finished[out.request_id] = out.finish_reason
        self.scheduler.check_invariants()
        return outputs

    def step(self):
        batch = self.scheduler.schedule()
        self.apply(batch, self.model.run(batch))
        return batch

    def run_until_done(self, max_steps: int = 10000) -> int:
        steps = 0
        while self.scheduler.has_unfinished():
            self.step()
            steps += 1
            assert steps < max_steps, "the scheduler stopped making progress"
        return steps
