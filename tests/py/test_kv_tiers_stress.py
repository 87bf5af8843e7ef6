"""Random traffic through a tiny pool and small tiers: requests arrive, are aborted (also while
their prefix loads), preempt each other and evict blocks from every tier. Invariants hold after
every step, every request that finished has the tokens computed without tiers, and at the end the
pool, the host tier and the disk tier are back to rest with nothing leaked. At TP=2 too, where every
rank's tiers repeat rank 0's loads and saves (a transfer ends once both ranks' parts have)."""

import random

import pytest

from kv_tier_workload import BLOCK_SIZE, GREEDY, assert_idle, make_llm, prompts

BYTES_PER_BLOCK = 16384  # llama3 test checkpoint: 2 layers x K,V x 16 tokens x 2 heads x 32 dims x fp32
NUM_REQUESTS = 26


@pytest.mark.parametrize("tp", [1, 2])
def test_random_aborts_preemption_and_tier_traffic(tmp_path, tp):
    rng = random.Random(3)
    pool = prompts(seed=5, count=NUM_REQUESTS)
    reference = make_llm(kv_host_cache_gib=0, num_blocks=64)
    expected = {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(pool, reference.generate(pool, GREEDY))}

    llm = make_llm(num_blocks=12,  # two requests fill it: preemption
                   kv_host_cache_gib=24 * BYTES_PER_BLOCK / 2**30,  # host evictions
                   kv_disk_cache_dir=str(tmp_path), kv_disk_cache_gib=16 * (BYTES_PER_BLOCK + 4096) / 2**30,
                   tensor_parallel_size=tp)
    try:
        _run(llm, pool, expected, rng)
    finally:
        llm.engine.shutdown()  # one tensor-parallel engine per process


def _run(llm, pool, expected, rng) -> None:
    engine = llm.engine
    submitted: dict[str, list[int]] = {}
    aborted: set[str] = set()
    finished: dict[str, list[int]] = {}
    steps = 0
    while len(submitted) < NUM_REQUESTS or engine.has_unfinished_requests():
        if len(submitted) < NUM_REQUESTS and rng.random() < 0.4:
            request_id = f"r{len(submitted)}"
            submitted[request_id] = pool[len(submitted)]
            engine.add_request(request_id, submitted[request_id], GREEDY)
        if rng.random() < 0.08:
            live = [r for r in submitted if r not in finished and r not in aborted]
            if live:
                victim = rng.choice(live)
                engine.abort_request(victim)
                aborted.add(victim)
        for output in engine.step():
            if output.finished and output.request_id not in aborted:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        engine.scheduler.check_invariants()
        if steps % 10 == 0:
            engine.kv_tiers.check_invariants()
            # Disk writes run on background threads: on a busy machine they could lag the whole run
            # and the disk tier would never fill. Let them land now and then.
            engine.kv_tiers.flush()
        steps += 1
        assert steps < 5000, "no progress"

    for request_id, tokens in finished.items():
        assert tokens == expected[tuple(submitted[request_id])], request_id
    assert len(finished) + len(aborted) == NUM_REQUESTS
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_tier_hit_tokens >= 10 * BLOCK_SIZE
    tiers = {t.name: t for t in stats.kv_tiers}
    assert tiers["host"].evicted_blocks > 0 and tiers["disk"].evicted_blocks > 0
    assert_idle(llm)
