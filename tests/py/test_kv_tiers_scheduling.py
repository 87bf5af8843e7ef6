"""The engine's path through a tier below the KV pool, with a Python connector that can fail,
stall or hang on demand (kv_tier_fakes.py): whatever the tier does, greedy outputs are the ones
computed without it, and no request or KV block is left behind."""

import random

import pytest

from checkpoints import checkpoint_path
from kv_tier_fakes import attach_fake_tier
from rtpllm import LLM, SamplingParams
from rtpllm import _C

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
NUM_BLOCKS = 20  # 320 tokens of pool; the workload's prefixes alone are 4 x 96 tokens


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 500) for _ in range(96)] for _ in range(4)]
    return [systems[i % 4] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 30))] for i in range(count)]


def _llm() -> LLM:
    return LLM(model=checkpoint_path("llama3"), num_blocks=NUM_BLOCKS, block_size=16, kv_host_cache_gib=0,
               max_num_seqs=4)


def _generate(llm: LLM, prompts: list[list[int]], wave: int = 4) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), wave):
        out += [list(o.outputs[0].token_ids) for o in llm.generate(prompts[i:i + wave], GREEDY)]
    return out


@pytest.fixture(scope="module")
def expected():
    """Outputs without any tier, keyed by prompt."""
    prompts = _prompts(12, seed=1)
    return dict(zip(map(tuple, prompts), _generate(_llm(), prompts)))


def test_tier_hits_give_the_same_tokens(expected):
    llm = _llm()
    fake = attach_fake_tier(llm.engine)
    fake.latency_polls = 2
    prompts = list(map(list, expected))
    assert _generate(llm, prompts) == list(expected.values())
    stats = llm.engine.stats()
    assert stats.kv_tier_hit_tokens >= 16 * 6 * 4, "prefixes evicted from the pool must come back from the tier"
    assert stats.kv_tier_failed_loads == 0
    assert fake.counters["loaded_blocks"] * 16 == stats.kv_tier_hit_tokens
    assert llm.engine.check_kv_pool_free()
    assert not fake.open


def test_failed_loads_recompute_the_same_tokens(expected):
    llm = _llm()
    fake = attach_fake_tier(llm.engine)
    prompts = list(map(list, expected))
    _generate(llm, prompts[:4])  # fill the tier
    fake.fail_loads = True
    assert _generate(llm, prompts[4:]) == list(expected.values())[4:]
    stats = llm.engine.stats()
    assert stats.kv_tier_failed_loads > 0 and stats.kv_tier_hit_tokens == 0
    assert llm.engine.check_kv_pool_free()


def test_hung_loads_time_out_and_recompute(expected):
    llm = _llm()
    fake = attach_fake_tier(llm.engine, load_timeout_s=0.05)
    prompts = list(map(list, expected))
    _generate(llm, prompts[:4])
    fake.hang_loads = True
    # One at a time: a hung load keeps its blocks reserved until it ends, so the pool has room for
    # one such load beside a recompute, not four.
    assert _generate(llm, prompts[4:5], wave=1) == list(expected.values())[4:5]
    assert llm.engine.stats().kv_tier_failed_loads > 0
    assert llm.engine.has_pending_kv_transfers(), "the hung load still holds its blocks"
    fake.release_hung_loads()  # it ends at last (writing into blocks nobody else was given)
    assert llm.engine.check_kv_pool_free()
    assert _generate(llm, prompts[5:]) == list(expected.values())[5:]


def test_abort_while_waiting_for_kv_leaves_nothing_behind(expected):
    llm = _llm()
    engine = llm.engine
    fake = attach_fake_tier(engine)
    prompts = list(map(list, expected))
    _generate(llm, prompts[:4])
    _generate(llm, _prompts(4, seed=2))  # other prefixes push these out of the pool
    fake.hang_loads = True
    engine.add_request("r", prompts[4], GREEDY)
    engine.step()
    fake.hang_loads = False  # only this request's load hangs
    assert engine.stats().num_waiting_for_kv == 1
    engine.abort_request("r")
    engine.step()
    assert engine.scheduler.num_free_blocks < NUM_BLOCKS, "the hung load's blocks must stay reserved"
    assert _generate(llm, prompts[5:8]) == list(expected.values())[5:8]  # others are served meanwhile
    fake.release_hung_loads()
    assert engine.check_kv_pool_free()
    assert not engine.has_unfinished_requests()


def test_root_hash_is_the_chain_root():
    llm = _llm()
    engine = llm.engine
    assert engine.cache_root_hash != _C.ROOT_BLOCK_HASH
    assert engine.scheduler.cache_options.root_hash == engine.cache_root_hash
    prompt = list(range(3, 40))
    engine.add_request("r", prompt, GREEDY)
    engine.step()
    hashes = engine.scheduler.get_request(engine._groups["r"].seqs[0].seq_id).block_hashes
    assert hashes[0] == _C.hash_block_tokens(engine.cache_root_hash, prompt[:16])
    assert hashes[1] == _C.hash_block_tokens(hashes[0], prompt[16:32])
