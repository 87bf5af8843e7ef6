"""A prefix-heavy workload whose working set is several times the KV pool, for the tier tests.

Six "system prompts" of five blocks each, every one used by two requests far apart in time: by
the second use, the pool (16 blocks) has long been filled by the others, so a prefix can only
come back from a tier below it. `expected_outputs()` is the reference: the same requests with
no tier at all, computed once per test session.
"""

from __future__ import annotations

import functools
import random

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams

BLOCK_SIZE = 16
NUM_BLOCKS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
MODEL = "llama3"


def prompts(seed: int = 1, count: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 500) for _ in range(5 * BLOCK_SIZE)] for _ in range(6)]
    return [systems[i % 6] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 20))] for i in range(count)]


def make_llm(model: str = MODEL, **options) -> LLM:
    """`model`: a tests/py/checkpoints.py variant (the GPU tests need the CUDA kernels' head_dim 64 or 128)."""
    options.setdefault("num_blocks", NUM_BLOCKS)
    return LLM(model=checkpoint_path(model), block_size=BLOCK_SIZE, max_num_seqs=3, **options)


def generate(llm: LLM, batch: list[list[int]], wave: int = 3) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(batch), wave):
        out += [list(o.outputs[0].token_ids) for o in llm.generate(batch[i:i + wave], GREEDY)]
    return out


@functools.lru_cache(maxsize=None)
def _expected(seed: int, count: int) -> tuple[tuple[int, ...], ...]:
    llm = make_llm(kv_host_cache_gib=0)
    return tuple(map(tuple, generate(llm, prompts(seed, count))))


def expected_outputs(seed: int = 1, count: int = 12) -> list[list[int]]:
    return [list(o) for o in _expected(seed, count)]


def tier_stats(llm: LLM) -> dict:
    """name -> KVTierSnapshot of the engine's tiers."""
    return {t.name: t for t in llm.engine.stats().kv_tiers}


def assert_idle(llm: LLM) -> None:
    """The pool, every tier and the scheduler are back to rest: no request, no transfer, no held block."""
    engine = llm.engine
    assert engine.check_kv_pool_free()
    assert not engine.has_pending_kv_transfers()
    assert engine.scheduler.stats().kv_transfer_held_blocks == 0
    if engine.kv_tiers is not None:
        engine.kv_tiers.flush()
        engine.kv_tiers.check_invariants()
        for t in engine.stats().kv_tiers:
            assert t.used_blocks <= t.capacity_blocks
