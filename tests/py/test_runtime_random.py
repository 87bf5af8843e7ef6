"""Randomized traffic through the bindings: arrivals, aborts (also mid-step), preemptions, prefix sharing.

The fake model checks every KV read; invariants are checked after every step; at the end every
request finished for a reason its outputs justify and the pool is fully free.
"""

import random

import pytest

from rtpllm import _C
from runtime_harness import Driver

VOCAB = 61
MAX_MODEL_LEN = 48


@pytest.mark.parametrize("chunked, prefix_caching, seed", [(True, True, 1), (False, True, 2), (True, False, 3)])
def test_random_traffic(chunked, prefix_caching, seed):
    rng = random.Random(seed)
    d = Driver(max_num_batched_tokens=24, max_num_seqs=6, enable_chunked_prefill=chunked,
               max_model_len=MAX_MODEL_LEN, num_blocks=14, block_size=4, enable_prefix_caching=prefix_caching,
               vocab_size=VOCAB)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 12))] for _ in range(3)]
    specs, aborted, next_id = {}, set(), 0
    while next_id < 300 or d.scheduler.has_unfinished():
        for _ in range(rng.randint(0, 2) if next_id < 300 and d.scheduler.num_waiting < 8 else 0):
            prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else []
            prompt += [rng.randrange(VOCAB) for _ in range(rng.randint(0 if prompt else 1, 16))]
            spec = dict(max_new_tokens=rng.randint(1, 16), stop_token_ids=rng.sample(range(VOCAB), rng.randint(0, 2)),
                        priority=rng.randint(0, 2), extra_key=int(rng.random() < 0.1))
            spec["min_new_tokens"] = rng.randint(0, min(2, spec["max_new_tokens"]))
            d.add(next_id, prompt, **spec)
            specs[next_id] = (prompt, spec)
            next_id += 1
        if rng.random() < 0.08 and next_id:
            victim = rng.randrange(next_id)
            if d.scheduler.abort(victim):
                aborted.add(victim)
        batch = d.scheduler.schedule()
        sampled = d.model.run(batch)
        if rng.random() < 0.05 and batch.num_seqs:
            victim = rng.choice(batch.request_ids.tolist())
            if d.scheduler.abort(victim):
                aborted.add(victim)
        d.apply(batch, sampled)

    stats = d.scheduler.stats()
    assert d.scheduler.num_free_blocks == 14 and stats.blocks_used == 0
    assert stats.num_preempted_total > 0
    if prefix_caching:
        assert stats.prefix_hits > 0
    for rid, (prompt, spec) in specs.items():
        if rid in aborted:
            continue
        out, reason = d.generated[rid], d.finished[rid]
        assert out and all(t not in spec["stop_token_ids"] for t in out[spec["min_new_tokens"]:-1])
        if reason == _C.FinishReason.STOP:
            assert out[-1] in spec["stop_token_ids"] and len(out) >= spec["min_new_tokens"]
        else:
            assert reason == _C.FinishReason.LENGTH
            assert len(out) == spec["max_new_tokens"] or len(prompt) + len(out) == MAX_MODEL_LEN
