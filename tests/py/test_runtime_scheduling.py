"""Scheduling through the bindings: chunked prefill, decode-first, prefix hits, preemption, stops, aborts."""

from rtpllm import _C
from runtime_harness import Driver


def test_decodes_first_then_prefill_chunks():
    d = Driver(max_num_batched_tokens=8, num_blocks=64)
    d.add(1, [1, 2, 3, 4, 5], max_new_tokens=50)
    d.step()
    d.add(2, list(range(300, 320)), max_new_tokens=4)
    for chunk in range(3):
        batch = d.step()
        assert batch.request_ids.tolist() == [1, 2]
        assert batch.query_start_loc.tolist() == [0, 1, 8 if chunk < 2 else 7]
        assert batch.num_computed.tolist()[1] == 7 * chunk
        assert batch.sampled_request_ids.tolist() == ([1] if chunk < 2 else [1, 2])
    d.run_until_done()
    assert len(d.generated[1]) == 50 and len(d.generated[2]) == 4


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_step():
    d = Driver(max_num_batched_tokens=16, enable_chunked_prefill=False)
    d.add(1, [1, 2, 3, 4], max_new_tokens=3)
    d.step()
    d.add(2, list(range(50, 66)), max_new_tokens=2)
    while d.scheduler.get_request(1) is not None:
        assert 2 not in d.step().request_ids.tolist()
    batch = d.step()
    assert batch.request_ids.tolist() == [2] and batch.num_tokens == 16


def test_prefix_hit_skips_cached_blocks():
    d = Driver(num_blocks=32, block_size=4)
    d.add(1, list(range(40, 51)), max_new_tokens=1)
    d.run_until_done()
    d.add(2, list(range(40, 54)), max_new_tokens=1)
    batch = d.step()
    assert batch.num_computed.tolist() == [8] and batch.positions.tolist() == list(range(8, 14))
    assert batch.block_tables[0, :2].tolist() == [0, 1]  # request 1's cached blocks head the table
    assert d.scheduler.stats().prefix_hits == 8


def _unconstrained(prompts, max_new_tokens):
    outputs = {}
    for rid, prompt in prompts.items():
        d = Driver(num_blocks=64)
        d.add(rid, prompt, max_new_tokens=max_new_tokens)
        d.run_until_done()
        outputs[rid] = d.generated[rid]
    return outputs


def test_preemption_recomputes_and_keeps_outputs():
    prompts = {1: list(range(10, 18)), 2: list(range(60, 68)), 3: list(range(90, 98))}
    d = Driver(num_blocks=8, block_size=4)
    for rid, prompt in prompts.items():
        d.add(rid, prompt, max_new_tokens=12)
    preempted_outputs = None
    while d.scheduler.has_unfinished():
        d.step()
        state = d.scheduler.get_request(3)
        if state is not None and state.status == _C.RequestStatus.PREEMPTED:
            assert state.block_table == [] and state.num_computed_tokens == 0
            preempted_outputs = state.output_token_ids
            assert preempted_outputs == d.generated[3]  # generated tokens survive preemption
    assert preempted_outputs is not None, "the pool never ran out"
    assert d.scheduler.stats().num_preempted_total >= 1
    assert dict(d.generated) == _unconstrained(prompts, 12)
    assert d.scheduler.num_free_blocks == 8


def test_stop_tokens_respect_min_new_tokens():
    d = Driver()
    d.add(1, [1, 2, 3], max_new_tokens=10, stop_token_ids=[9], min_new_tokens=2)
    outs = []
    for _ in range(3):
        batch = d.scheduler.schedule()
        outs += d.apply(batch, [9] * batch.num_sampled)
    assert [o.finished for o in outs] == [False, True]
    assert outs[1].finish_reason == _C.FinishReason.STOP and outs[1].stop_token_id == 9
    assert outs[1].new_token_ids == [9] and not d.scheduler.has_unfinished()


def test_context_limit_finishes_with_length():
    d = Driver(max_model_len=8)
    d.add(1, list(range(1, 7)), max_new_tokens=100)
    d.run_until_done()
    assert d.finished[1] == _C.FinishReason.LENGTH and len(d.generated[1]) == 2


def test_abort_in_flight_drops_the_sampled_token():
    d = Driver(num_blocks=32)
    d.add(1, [1, 2, 3, 4, 5], max_new_tokens=10)
    d.add(2, list(range(100, 106)), max_new_tokens=10)
    batch = d.scheduler.schedule()
    sampled = d.model.run(batch)
    assert d.scheduler.abort(1)
    assert d.scheduler.num_free_blocks == 30  # freed at once
    outs = d.apply(batch, sampled)
    assert [o.request_id for o in outs] == [2] and 1 not in d.generated
    d.run_until_done()
    assert d.scheduler.num_free_blocks == 32
