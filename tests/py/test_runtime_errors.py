"""Bad input to rtpllm._C raises ValueError naming the field and leaves the scheduler unchanged."""

import numpy as np
import pytest

from rtpllm import _C
from runtime_harness import Driver


def _scheduler(**scheduler):
    options = dict(max_num_batched_tokens=32, max_num_seqs=8, enable_chunked_prefill=True, max_model_len=64)
    options.update(scheduler)
    return _C.Scheduler(_C.SchedulerOptions(**options), _C.CacheOptions(num_blocks=8, block_size=4))


@pytest.mark.parametrize("scheduler, cache, field", [
    ({"max_num_batched_tokens": 0}, {}, "max_num_batched_tokens"),
    ({"max_num_batched_tokens": -8}, {}, "max_num_batched_tokens"),
    ({"max_num_seqs": 0}, {}, "max_num_seqs"),
    ({"max_model_len": -1}, {}, "max_model_len"),
    ({}, {"block_size": 0}, "block_size"),
    ({}, {"block_size": -16}, "block_size"),
    ({}, {"num_blocks": 0}, "num_blocks"),
])
def test_bad_options(scheduler, cache, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        _C.Scheduler(_C.SchedulerOptions(**scheduler), _C.CacheOptions(**cache))


@pytest.mark.parametrize("spec, field", [
    ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"prompt_token_ids": list(range(1, 66))}, "prompt_token_ids"),  # longer than max_model_len = 64
    ({"prompt_token_ids": list(range(1, 34))}, "prompt_token_ids"),  # more than the pool's 8 x 4 tokens
    ({"prompt_token_ids": [1, -2, 3]}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, 2**40]}, "prompt_token_ids"),
    ({"prompt_token_ids": ["a"]}, "prompt_token_ids"),
    ({"prompt_token_ids": np.array([1.5, 2.0])}, "prompt_token_ids"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": 20, "max_new_tokens": 10}, "min_new_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"request_id": 1}, "request_id"),  # duplicate of a queued request
])
def test_bad_requests_leave_the_scheduler_unchanged(spec, field):
    sched = _scheduler()
    sched.add_request(_C.RequestSpec(request_id=1, prompt_token_ids=[1, 2, 3]))
    full = dict(request_id=2, prompt_token_ids=[4, 5, 6])
    full.update(spec)
    with pytest.raises(ValueError, match=f"^{field}:"):
        sched.add_request(_C.RequestSpec(**full))
    sched.check_invariants()
    assert sched.num_waiting == 1 and sched.num_free_blocks == 8
    assert sched.schedule().request_ids.tolist() == [1]


def test_prompt_beyond_the_step_budget_needs_chunked_prefill():
    sched = _scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="^prompt_token_ids:.*chunked prefill"):
        sched.add_request(_C.RequestSpec(request_id=1, prompt_token_ids=list(range(9))))
    chunked = _scheduler(max_num_batched_tokens=8)
    chunked.add_request(_C.RequestSpec(request_id=1, prompt_token_ids=list(range(9))))


def test_update_rejects_wrong_batches_and_counts():
    d = Driver()
    d.add(1, [1, 2, 3])
    batch = d.scheduler.schedule()
    with pytest.raises(ValueError, match="^sampled_token_ids:"):
        d.scheduler.update(batch, np.array([1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="^sampled_token_ids:"):
        d.scheduler.update(batch, np.array([-4], dtype=np.int32))
    with pytest.raises(ValueError, match="^sampled_token_ids:"):
        d.scheduler.update(batch, np.array([1.0]))
    other = Driver()
    with pytest.raises(ValueError, match="^batch:"):
        other.scheduler.update(batch, [1])
    d.apply(batch, d.model.run(batch))  # nothing above changed anything
    with pytest.raises(ValueError, match="^batch:"):
        d.scheduler.update(batch, [1])  # already applied


def test_abort_reason_must_be_a_finish_reason():
    d = Driver()
    d.add(1, [1, 2, 3])
    with pytest.raises(ValueError, match="^reason:"):
        d.scheduler.abort(1, _C.FinishReason.NONE)
    assert d.scheduler.num_waiting == 1
    assert d.scheduler.abort(1, reason=_C.FinishReason.ERROR)
    assert not d.scheduler.abort(1) and not d.scheduler.abort(12345)
