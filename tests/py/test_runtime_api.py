"""rtpllm._C bindings: options, request specs, the batch arrays (numpy views), outputs, stats, hashing."""

import gc

import numpy as np
import pytest

from rtpllm import _C
from runtime_harness import Driver


def test_options_have_documented_defaults():
    options = _C.SchedulerOptions()
    assert (options.max_num_batched_tokens, options.max_num_seqs, options.enable_chunked_prefill,
            options.max_model_len) == (8192, 256, True, 4096)
    cache = _C.CacheOptions()
    assert (cache.num_blocks, cache.block_size, cache.enable_prefix_caching) == (1024, 16, True)
    assert "max_num_seqs=256" in repr(options) and "block_size=16" in repr(cache)


def test_request_spec_accepts_lists_and_integer_arrays():
    for prompt in ([5, 6, 7], np.array([5, 6, 7], dtype=np.int32), np.array([5, 6, 7], dtype=np.int64),
                   np.array([0, 5, 6, 7], dtype=np.int32)[1:]):
        spec = _C.RequestSpec(request_id=1, prompt_token_ids=prompt, stop_token_ids=np.array([2]))
        assert spec.prompt_token_ids == [5, 6, 7] and spec.stop_token_ids == [2]
    spec = _C.RequestSpec(request_id=3, prompt_token_ids=[1])
    assert (spec.max_new_tokens, spec.stop_token_ids, spec.min_new_tokens, spec.priority, spec.extra_key) == \
        (16, [], 0, 0, 0)


def test_prefill_then_decode_arrays():
    d = Driver(num_blocks=16, block_size=4)
    d.add(7, list(range(100, 110)), max_new_tokens=3)
    batch = d.scheduler.schedule()
    assert (batch.num_seqs, batch.num_tokens, batch.num_sampled, batch.max_query_len, batch.max_seq_len) == \
        (1, 10, 1, 10, 10)
    expected_dtypes = {"request_ids": np.int64, "input_token_ids": np.int32, "positions": np.int32,
                       "query_start_loc": np.int32, "seq_lens": np.int32, "num_computed": np.int32,
                       "block_tables": np.int32, "slot_mapping": np.int64, "logits_indices": np.int32,
                       "sampled_request_ids": np.int64}
    for name, dtype in expected_dtypes.items():
        array = getattr(batch, name)
        assert array.dtype == dtype and array.flags.c_contiguous, name
    assert batch.input_token_ids.tolist() == list(range(100, 110))
    assert batch.positions.tolist() == list(range(10))
    assert batch.query_start_loc.tolist() == [0, 10]
    assert batch.block_tables.shape == (1, 3) and batch.block_tables.tolist() == [[0, 1, 2]]
    assert batch.slot_mapping.tolist() == list(range(10))
    assert batch.logits_indices.tolist() == [9] and batch.sampled_request_ids.tolist() == [7]
    outputs = d.apply(batch, d.model.run(batch))
    assert len(outputs) == 1 and outputs[0].request_id == 7 and len(outputs[0].new_token_ids) == 1
    assert not outputs[0].finished and outputs[0].finish_reason == _C.FinishReason.NONE
    assert outputs[0].stop_token_id == -1

    # The sampled token is computed next step at position P = 10; the context becomes 11.
    decode = d.step()
    assert decode.input_token_ids.tolist() == d.generated[7][:1]
    assert decode.positions.tolist() == [10] and decode.seq_lens.tolist() == [11]
    assert decode.num_computed.tolist() == [10] and decode.slot_mapping.tolist() == [2 * 4 + 2]
    d.run_until_done()
    assert d.finished[7] == _C.FinishReason.LENGTH and len(d.generated[7]) == 3
    assert d.scheduler.num_free_blocks == 16


def test_arrays_are_views_that_keep_the_batch_alive():
    d = Driver()
    d.add(1, list(range(1, 40)))
    batch = d.scheduler.schedule()
    tokens = batch.input_token_ids
    assert np.shares_memory(tokens, batch.input_token_ids)  # a view each time, never a copy
    del batch
    gc.collect()
    assert tokens.tolist() == list(range(1, 40))  # the view still owns the batch's memory


def test_empty_batch_when_idle():
    d = Driver()
    batch = d.scheduler.schedule()
    assert batch.num_seqs == 0 and batch.num_tokens == 0 and len(batch) == 0
    assert batch.query_start_loc.tolist() == [0] and batch.block_tables.shape == (0, 0)
    assert d.scheduler.update(batch, np.zeros(0, dtype=np.int32)) == []


def test_stats_and_request_snapshot():
    d = Driver(num_blocks=32, block_size=4)
    d.add(1, list(range(1, 12)), max_new_tokens=1)
    d.run_until_done()
    d.add(2, list(range(1, 15)), max_new_tokens=4, priority=2)
    d.step()
    state = d.scheduler.get_request(2)
    assert state.status == _C.RequestStatus.RUNNING and state.priority == 2
    assert state.num_computed_tokens == 14 and state.num_prompt_tokens == 14
    assert state.output_token_ids == d.generated[2] and len(state.block_table) == 4
    assert d.scheduler.get_request(1) is None  # finished requests are gone
    stats = d.scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.blocks_total) == (1, 0, 32)
    assert stats.prefix_queries == 11 + 14 and stats.prefix_hits == 8
    assert stats.blocks_used == 4 and stats.num_free_blocks == 28 and stats.kv_usage == pytest.approx(4 / 32)
    assert stats.num_steps == 2 and d.scheduler.num_running == 1 and d.scheduler.num_waiting == 0


def test_hash_block_tokens_is_the_stable_chained_key():
    # Same golden values as the C++ test: other processes key on them.
    assert _C.hash_block_tokens(_C.ROOT_BLOCK_HASH, [1, 2, 3, 4], 0) == 0x36A357BDF9C7848C
    assert _C.hash_block_tokens(0x1234, np.array([7], dtype=np.int32), extra_key=99) == 0xCFA047A00B6348E4
    first = _C.hash_block_tokens(0, [1, 2, 3, 4])
    assert _C.hash_block_tokens(first, [5, 6, 7, 8]) != _C.hash_block_tokens(0, [5, 6, 7, 8])
    assert _C.hash_block_tokens(0, [1, 2, 3, 4], 1) != first
