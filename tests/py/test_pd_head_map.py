"""Which prefill rank writes which KV heads into which decode rank (pd/head_map.py), for tensor-
parallel sizes that differ between the two sides: every decode rank's head comes exactly once, from
a prefill rank that holds it, and decode rank 0's first heads come from prefill rank 0."""

import pytest

from rtpllm.pd.head_map import HeadWrite, head_writes, rank_heads


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("prefill_tp", [1, 2, 4, 8])
@pytest.mark.parametrize("decode_tp", [1, 2, 4, 8])
def test_every_decode_head_comes_once_from_a_prefill_rank_that_holds_it(num_kv_heads, prefill_tp, decode_tp):
    writes = head_writes(num_kv_heads, prefill_tp, decode_tp)
    for d in range(decode_tp):
        wanted = list(rank_heads(num_kv_heads, d, decode_tp))
        got = [None] * len(wanted)
        for w in (w for w in writes if w.decode_rank == d):
            source = rank_heads(num_kv_heads, w.prefill_rank, prefill_tp)
            for i in range(w.num_heads):
                assert got[w.dst_head_offset + i] is None, f"decode rank {d} head {w.dst_head_offset + i} twice"
                got[w.dst_head_offset + i] = source[w.src_head_offset + i]
        assert got == wanted
    first = next(w for w in writes if w.decode_rank == 0)
    assert (first.prefill_rank, first.src_head_offset, first.dst_head_offset) == (0, 0, 0)


def test_equal_sizes_are_rank_to_rank_and_differing_sizes_split_or_gather():
    assert head_writes(8, 2, 2) == [HeadWrite(0, 0, 0, 0, 4), HeadWrite(1, 1, 0, 0, 4)]
    assert head_writes(8, 1, 2) == [HeadWrite(0, 0, 0, 0, 4), HeadWrite(0, 1, 4, 0, 4)]
    assert head_writes(8, 2, 1) == [HeadWrite(0, 0, 0, 0, 4), HeadWrite(1, 0, 0, 4, 4)]
    # 2 heads on 4 prefill ranks (each replicated twice) into 1 decode rank: one holder each.
    assert head_writes(2, 4, 1) == [HeadWrite(0, 0, 0, 0, 1), HeadWrite(2, 0, 0, 1, 1)]
    # ... and into 4 decode ranks: the replicas spread the writes (each rank writes its own).
    assert [w.prefill_rank for w in head_writes(2, 4, 4)] == [0, 1, 2, 3]


def test_a_size_that_cannot_hold_the_heads_names_tensor_parallel_size():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        head_writes(6, 1, 4)
