"""Which prefill rank writes which KV heads into which decode rank, for any two tensor-parallel sizes.

A rank holds a contiguous range of the model's KV heads (distributed/partition.py: evenly, or one
head replicated on several ranks when there are fewer heads than ranks). Every head that a decode
rank holds must come from one prefill rank that holds it: `head_writes` cuts each decode rank's
range at the prefill ranks' boundaries. Where a head is replicated on several prefill ranks, decode
rank d takes it from the (d mod n)-th of its n holders, which spreads the writes; decode rank 0
always takes its first heads from prefill rank 0, so that prefill rank 0's layer-by-layer writes
(with the notices decode waits on) always exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtpllm.distributed.partition import split_heads


@dataclass(frozen=True)
class HeadWrite:
    prefill_rank: int
    decode_rank: int
    src_head_offset: int  # among the prefill rank's own heads
    dst_head_offset: int  # among the decode rank's own heads
    num_heads: int


def rank_heads(num_kv_heads: int, rank: int, tp_size: int) -> range:
    """The model's KV heads that `rank` of `tp_size` holds (ValueError naming tensor_parallel_size)."""
    shard = split_heads(num_kv_heads, rank, tp_size, "num_key_value_heads")
    return range(shard.start, shard.stop)


def head_writes(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[HeadWrite]:
    """Every decode rank's heads, each exactly once, as writes from prefill ranks (runs of
    consecutive heads from one prefill rank are one write)."""
    prefill = [rank_heads(num_kv_heads, p, prefill_tp) for p in range(prefill_tp)]
    writes: list[HeadWrite] = []
    for d in range(decode_tp):
        heads = rank_heads(num_kv_heads, d, decode_tp)
        for i, head in enumerate(heads):
            holders = [p for p, held in enumerate(prefill) if head in held]
            p = holders[d % len(holders)]
            last = writes[-1] if writes else None
            if (last is not None and last.decode_rank == d and last.prefill_rank == p
                    and last.dst_head_offset + last.num_heads == i):
                writes[-1] = HeadWrite(p, d, last.src_head_offset, last.dst_head_offset, last.num_heads + 1)
            else:
                writes.append(HeadWrite(p, d, head - prefill[p].start, i, 1))
    return writes
