"""The engine in a process of its own (`ProcessEngine`, what `rtpllm serve` runs): the wire format
(frames, output deltas) on its own, then the engine process itself.

The server suites (test_server_openai / _bad_input / _lifecycle) also run against it:
tests/run_all.sh runs them again with RTPLLM_TEST_ENGINE=process.
"""

import asyncio
import os
import random
import signal
import socket

import pytest

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.config import EngineConfig
from rtpllm.engine.async_engine import EngineDeadError
from rtpllm.engine.link.frames import FrameReader, FrameWriter, encode_frame
from rtpllm.engine.link.messages import AddAnswer, EngineDead, OutputDeltas, StepOutputs
from rtpllm.engine.link.output_deltas import OutputDeltaDecoder, OutputDeltaEncoder
from rtpllm.engine.link.process_engine import ProcessEngine
from rtpllm.engine.request_state import RequestGroup, SequenceState
from rtpllm.outputs import RequestMetrics
from server_harness import check_kv_pool_free, run_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


# ---------------------------------------------------------------------- wire format
def test_frames_survive_any_split_of_the_byte_stream():
    messages = [StepOutputs([AddAnswer(1, None)], OutputDeltas.empty(), {"x": "y" * n}, [], None) for n in (0, 1, 300)]
    messages += [EngineDead("z" * 70000)]
    stream = b"".join(encode_frame(m) for m in messages)
    rng = random.Random(0)
    for _ in range(20):
        reader, received, position = FrameReader(), [], 0
        while position < len(stream):
            step = rng.randint(1, 5000)
            received += reader.feed(stream[position:position + step])
            position += step
        assert received == messages


def test_frame_writer_keeps_what_a_full_socket_did_not_take():
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    writer = FrameWriter(left)
    frames = [encode_frame(EngineDead(os.urandom(1 << 19).hex())) for _ in range(8)]  # more than the socket buffers
    done = [writer.write(frame) for frame in frames]
    assert not all(done) and writer.pending
    reader, received = FrameReader(), []
    while len(received) < len(frames):
        writer.flush()
        try:
            received += reader.feed(right.recv(1 << 20))
        except BlockingIOError:
            pass
    assert [encode_frame(m) for m in received] == frames and not writer.pending
    # More frames while the backlog drains in small, uneven reads: order and bytes survive the
    # writer's partial sends and compactions.
    rng = random.Random(2)
    frames = [encode_frame(EngineDead(f"{i}:" + os.urandom(rng.randint(1, 150000)).hex())) for i in range(40)]
    received, queued = [], 0
    while len(received) < len(frames):
        if queued < len(frames) and rng.random() < 0.5:
            writer.write(frames[queued])
            queued += 1
        writer.flush()
        try:
            received += reader.feed(right.recv(rng.randint(1, 200000)))
        except BlockingIOError:
            pass
    assert [encode_frame(m) for m in received] == frames and not writer.pending
    left.close()
    right.close()


def _random_groups(rng: random.Random, steps: int):
    """The requests a few engine steps move, as the engine's live state: n > 1, logprobs, prompt
    logprobs filled in over chunks, a stop string cutting text, finishes."""
    params = SamplingParams()
    groups: dict[str, RequestGroup] = {}
    for step in range(steps):
        moved = []
        for rid in [f"r{i}" for i in range(4)]:
            group = groups.get(rid)
            if group is None:
                group = groups[rid] = RequestGroup(rid, f"prompt {rid}", [1, 2, 3], params,
                                                   RequestMetrics(1.0, 2.0, 3.0), num_cached_tokens=2)
                with_logprobs = rng.random() < 0.5
                for index in range(rng.randint(1, 3)):
                    group.seqs.append(SequenceState(index, index, group, params, None, None, None,
                                                    logprobs=[] if with_logprobs else None))
            for seq in group.seqs:
                if seq.finished:
                    continue
                new = [rng.randint(0, 999) for _ in range(rng.randint(0, 3))]
                seq.output_ids += new
                if seq.logprobs is not None:
                    seq.logprobs += [{t: -rng.random()} for t in new]
                    seq.cumulative_logprob -= 0.5 * len(new)
                seq.visible_text += "".join(f"<{t}>" for t in new)
                if rng.random() < 0.15:  # a stop string cuts the text
                    seq.visible_text = seq.visible_text[:max(0, len(seq.visible_text) - rng.randint(1, 6))]
                    seq.finish_reason, seq.stop_reason = "stop", "x"
            chunk_logprobs = group.prompt_logprobs or []
            if len(chunk_logprobs) < 6:  # prompt logprobs grow over the prompt's chunks
                group.prompt_logprobs = chunk_logprobs + ([{1: -0.5}] if chunk_logprobs else [None])
            group.metrics.last_token_time = 4.0 + step
            if group.finished:
                group.metrics.finished_time = 9.0
                del groups[rid]
            moved.append(group)
        yield moved


def test_output_deltas_rebuild_the_engines_cumulative_outputs():
    rng = random.Random(1)
    encoder, decoder = OutputDeltaEncoder(), OutputDeltaDecoder()
    handed_out = []
    for moved in _random_groups(rng, 60):
        frame = encode_frame(StepOutputs([], encoder.encode(moved), None, [], None))
        decoded = decoder.decode(FrameReader().feed(frame)[0].deltas)
        assert decoded == [group.to_output() for group in moved]
        handed_out.append((decoded, [repr(o) for o in decoded]))
    # An output handed out earlier never changes afterwards.
    assert all([repr(o) for o in decoded] == snapshot for decoded, snapshot in handed_out)


# ---------------------------------------------------------------------- the engine process
@pytest.fixture(scope="module")
def model_path():
    return checkpoint_path("llama3")


def test_text_decoded_beside_the_server_equals_the_engines_own(model_path):
    """A stream the engine sends as token ids only (detokenize=False), decoded by the server's
    OutputDeltaDecoder, reads the same text at every step as the engine's own incremental text,
    for every sample of an n=2 request, and through an abort."""
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2, skip_special_tokens=False)
    requests = [("a", "Once upon a time", GREEDY), ("b", [5, 300, 17], sampled), ("c", "def main():", sampled)]
    engines = [LLM(model=model_path, num_blocks=64).engine for _ in range(2)]
    encoder, decoder = OutputDeltaEncoder(), OutputDeltaDecoder(engines[1].tokenizer)
    for request_id, prompt, params in requests:
        engines[0].add_request(request_id, prompt, params)
        engines[1].add_request(request_id, prompt, params, detokenize=False)
        decoder.decode_text_of(request_id, params.skip_special_tokens)
    steps = 0
    while engines[0].has_unfinished_requests():
        steps += 1
        if steps == 4:
            for engine in engines:
                engine.abort_request("c")
        own = engines[0].step()
        moved = engines[1].step_groups()
        assert all(seq.visible_text == "" for group in moved for seq in group.seqs)  # the engine decoded nothing
        decoded = decoder.decode(FrameReader().feed(encode_frame(StepOutputs([], encoder.encode(moved), None, [],
                                                                             None)))[0].deltas)
        assert [(o.request_id, [(c.text, c.token_ids, c.finish_reason) for c in o.outputs]) for o in decoded] == \
            [(o.request_id, [(c.text, c.token_ids, c.finish_reason) for c in o.outputs]) for o in own]
    assert not engines[1].has_unfinished_requests()
    with pytest.raises(ValueError, match="stop"):
        engines[1].add_request("d", "x", SamplingParams(stop=["."]), detokenize=False)


async def _collect(engine, prompt, params, request_id):
    outputs = [output async for output in engine.generate(prompt, params, request_id)]
    return outputs


def test_process_engine_serves_what_the_offline_engine_computes(model_path):
    prompts = ["Once upon a time", "def main():", "The capital of", "Hello"]
    sampled = SamplingParams(max_tokens=8, temperature=0.8, seed=7, n=2, logprobs=2, stop=["e"])
    offline = LLM(model=model_path, num_blocks=64)
    expected = offline.generate(prompts, GREEDY) + offline.generate(["Tell me"], sampled)
    engine = ProcessEngine.from_config(EngineConfig.from_kwargs(model=model_path, num_blocks=64))
    assert engine.model_name == offline.engine.model_name and engine.max_model_len == offline.engine.max_model_len
    assert engine.tokenizer.encode("hello world") == offline.get_tokenizer().encode("hello world")

    async def body(engine):
        streams = await asyncio.gather(*(_collect(engine, p, GREEDY, f"g{i}") for i, p in enumerate(prompts)))
        # Alone, as offline: logprobs computed in another batch may differ in their last bits.
        streams.append(await _collect(engine, "Tell me", sampled, "sampled"))
        # Leaving a stream early aborts the request and frees its blocks.
        async for output in engine.generate("Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True),
                                            "leaver"):
            if len(output.outputs[0].token_ids) >= 3:
                break
        await asyncio.sleep(0.1)
        pool_free = await engine.call_in_engine_thread(check_kv_pool_free)
        # A bad request fails alone; a function that cannot be pickled is refused here.
        with pytest.raises(ValueError, match="prompt"):
            await engine.add_request("bad", "", GREEDY)
        with pytest.raises(TypeError, match="pickle"):
            await engine.call_in_engine_thread(lambda e: e.check_kv_pool_free())
        return streams, pool_free, engine.stats()

    streams, pool_free, stats = run_engine(engine, body)
    for outputs, want in zip(streams, expected):
        final = outputs[-1]
        assert final.finished and all(o.finished == (o is final) for o in outputs)
        assert [(c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in final.outputs] == \
            [(c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in want.outputs]
        token_counts = [len(o.outputs[0].token_ids) for o in outputs]
        assert token_counts == sorted(token_counts)  # cumulative
    assert pool_free and stats.kv_blocks_used == 0 and stats.num_running == 0


def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones(model_path):
    engine = ProcessEngine.from_config(EngineConfig.from_kwargs(model=model_path, num_blocks=64))

    async def body(engine):
        stream = await engine.add_request("victim", "hello", SamplingParams(max_tokens=2000, ignore_eos=True))
        await stream.__anext__()
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            async for _ in stream:
                pass
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.add_request("next", "hello", GREEDY)

    run_engine(engine, body)


def test_an_engine_that_cannot_start_raises_its_own_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        ProcessEngine.from_config(EngineConfig.from_kwargs(model=str(tmp_path / "missing"), num_blocks=16))
