"""AsyncEngine on its own: concurrent requests, aborts, admission control, shutdown, a failing step."""

import asyncio

import pytest

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, RequestStream
from rtpllm.outputs import CompletionOutput, RequestOutput
from server_harness import build_async_engine, run_engine

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = ["Once upon a time", "def main():", "The capital of", "1, 2, 3,", "Hello", "import os", "A B C", "x"]


@pytest.fixture(scope="module")
def model_path():
    return checkpoint_path("llama3")


async def _collect(engine: AsyncEngine, prompt, params, request_id):
    final = None
    async for output in engine.generate(prompt, params, request_id):
        final = output
    return final


def test_concurrent_requests_match_the_offline_engine(model_path):
    expected = LLM(model=model_path, num_blocks=64).generate(PROMPTS, GREEDY)

    async def body(engine):
        return await asyncio.gather(*(_collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))

    outputs = run_engine(build_async_engine(model_path), body)
    assert [o.outputs[0].text for o in outputs] == [e.outputs[0].text for e in expected]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)


def test_outputs_are_cumulative_and_end_with_the_finished_one(model_path):
    async def body(engine):
        seen = []
        async for output in engine.generate("Once upon a time", GREEDY, "only"):
            seen.append((len(output.outputs[0].token_ids), output.finished))
        return seen

    seen = run_engine(build_async_engine(model_path), body)
    counts = [count for count, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 10
    assert [finished for _, finished in seen] == [False] * (len(seen) - 1) + [True]


def test_unstreamed_request_yields_only_its_finished_output(model_path):
    async def body(engine):
        stream = await engine.add_request("whole", "Once upon a time", GREEDY, stream=False)
        return [output async for output in stream]

    outputs = run_engine(build_async_engine(model_path), body)
    assert len(outputs) == 1 and outputs[0].finished
    assert len(outputs[0].outputs[0].token_ids) == 10


def test_stream_interval_wakes_for_the_first_token_then_every_n(model_path):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = build_async_engine(model_path)
    engine.stream_interval = 8

    async def body(engine):
        stream = await engine.add_request("chunky", "Once upon a time", params)
        counts = []
        async for output in stream:
            counts.append(len(output.outputs[0].token_ids))
            await asyncio.sleep(0.05)  # a slow reader: never behind by less than the interval
        return counts

    counts = run_engine(engine, body)
    assert counts[0] == 1 and counts[-1] == 20
    assert all(later - earlier >= 8 for earlier, later in zip(counts[:-2], counts[1:-1]))


def _output(num_tokens: int, finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(0, "x" * num_tokens, list(range(num_tokens)),
                                  finish_reason="length" if finished else None)
    return RequestOutput("r", None, [1], [completion], finished)


def test_request_stream_keeps_the_newest_output_and_survives_a_cancelled_reader():
    async def main():
        stream = RequestStream("r")
        stream.put(_output(1), 1)
        stream.put(_output(2), 2)  # the reader fell behind: only the newest is kept
        assert len((await stream.__anext__()).outputs[0].token_ids) == 2
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        reader.cancel()  # a reader cancelled while waiting (its client went away) ...
        await asyncio.gather(reader, return_exceptions=True)
        stream.put(_output(3, finished=True), 3)  # ... does not break the next put or reader
        outputs = [output async for output in stream]
        assert [len(o.outputs[0].token_ids) for o in outputs] == [3] and outputs[0].finished

        failing = RequestStream("f")
        waiting = asyncio.ensure_future(failing.__anext__())
        await asyncio.sleep(0)
        failing.fail(EngineDeadError("gone"))
        with pytest.raises(EngineDeadError):
            await waiting

    asyncio.run(main())


def test_leaving_a_stream_early_aborts_and_frees_blocks(model_path):
    long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)

    async def body(engine):
        async for output in engine.generate("Once upon a time", long, "leaver"):
            if len(output.outputs[0].token_ids) >= 3:
                break
        await asyncio.sleep(0.05)  # the abort lands at the next step
        return engine.num_in_flight, await engine.call_in_engine_thread(lambda e: e.check_kv_pool_free())

    in_flight, pool_free = run_engine(build_async_engine(model_path), body)
    assert in_flight == 0 and pool_free


def test_rejected_request_raises_and_leaves_the_engine_serving(model_path):
    async def body(engine):
        with pytest.raises(ValueError, match="prompt"):
            await engine.add_request("bad", "", GREEDY)
        with pytest.raises(ValueError, match="request_id"):
            stream = await engine.add_request("dup", "hello", GREEDY)
            await engine.add_request("dup", "hello", GREEDY)
        async for _ in stream:
            pass
        return await _collect(engine, "hello", GREEDY, "after")

    assert run_engine(build_async_engine(model_path), body).finished


def test_full_waiting_queue_raises_overloaded(model_path):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def body(engine):
        running = await engine.add_request("running", "hello", long)
        await running.__anext__()  # scheduled: it holds the only running slot
        waiting = await engine.add_request("waiting", "hello", long)
        with pytest.raises(EngineOverloadedError, match="max_queued_requests=1"):
            await engine.add_request("rejected", "hello", long)
        engine.abort("running")
        engine.abort("waiting")
        return waiting

    run_engine(build_async_engine(model_path, max_num_seqs=1, max_queued_requests=1), body)


def test_shutdown_aborts_in_flight_requests_and_refuses_new_ones(model_path):
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    engine = build_async_engine(model_path, max_model_len=1024)

    async def main():
        engine.start()
        stream = await engine.add_request("in-flight", "hello", long)
        await stream.__anext__()
        await engine.shutdown(grace_period_s=0.0)
        outputs = [output async for output in stream]
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", "hello", GREEDY)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) < 500
    assert engine.engine.check_kv_pool_free()
    assert not engine.is_running


def test_a_failing_step_fails_every_waiter_with_engine_dead(model_path):
    engine = build_async_engine(model_path)

    def broken_step():
        raise RuntimeError("device lost")

    engine.engine.step = broken_step

    async def body(engine):
        with pytest.raises(EngineDeadError, match="device lost"):
            await _collect(engine, "hello", GREEDY, "victim")
        with pytest.raises(EngineDeadError):
            await engine.add_request("next", "hello", GREEDY)
        return engine.is_running

    assert run_engine(engine, body) is False
