"""The typed messages of the server <-> engine-process and engine <-> worker links
(engine/link/messages.py): every one survives a frame unchanged, and a frame that does not hold
one fails with MalformedMessage naming the message and field, never a misread."""

import pickle
import struct

import numpy as np
import pytest

from rtpllm.engine.link.frames import FrameReader, encode_frame
from rtpllm.engine.instance_report import KVEventBatch
from rtpllm.engine.link.messages import (AbortRequest, AddAnswer, AddRequest, CallInEngine, CallResult, EngineDead,
                                         EngineFailed, EngineInfo, EngineReady, InitEngine, InitRunner, InitWorker,
                                         MalformedMessage, OutputDeltas, PromptHeader, PromptLogprobsDelta,
                                         RequestTimes, StepOutputs, StopEngine, StopWorker, WorkerError, WorkerLoaded,
                                         WorkerPDAck, WorkerPDGrant, WorkerPDPush, WorkerPDPushed, WorkerPDRevoke,
                                         WorkerReady, WorkerStep, from_wire, to_wire)
from rtpllm.engine.link.output_deltas import OutputDeltaDecoder
from rtpllm.engine.link.stats_wire import stats_from_wire, stats_to_wire
from rtpllm.engine.stats import EngineStats
from rtpllm.sampling_params import SamplingParams

STATS = EngineStats(1, 2, 3, 40, 5, 6, 0, 7, 8)


def _deltas() -> OutputDeltas:
    """Request "a" (one sample, finishing) and "b" (two samples), both in their first delta."""
    deltas = OutputDeltas.empty()
    deltas.headers, deltas.times, deltas.texts, deltas.finishes = {}, {}, {}, {}
    for rid, n in (("a", 1), ("b", 2)):
        deltas.request_ids.append(rid)
        deltas.last_token_time.append(1.5)
        for index in range(n):
            position = len(deltas.new_token_ids)
            deltas.new_token_ids.append([7, index])
            deltas.texts[position] = (0, f"{rid}{index}")
            if rid == "a":
                deltas.finishes[position] = ("length", None)
        deltas.headers[rid] = PromptHeader(f"prompt {rid}", [1, 2], n)
        deltas.times[rid] = RequestTimes(1.0, 1.25, 1.5, 2.0 if rid == "a" else None, 0)
    deltas.prompt_logprobs = {"b": PromptLogprobsDelta(0, [None, {2: -0.5}])}
    return deltas


MESSAGES = [
    InitEngine({"model": "x"}, 20),
    AddRequest(3, "req-1", [1, 2, 3], SamplingParams(max_tokens=4), 12.5, True, False),
    AbortRequest("req-1"),
    CallInEngine(4, len),
    StopEngine(),
    EngineReady(EngineInfo("m", 128, 1000, STATS, {"who": "engine"})),
    EngineFailed(FileNotFoundError("no model"), "Traceback ..."),
    StepOutputs([AddAnswer(3, None), AddAnswer(5, ValueError("prompt: empty"))], _deltas(), stats_to_wire(STATS),
                [CallResult(4, True, 17)], KVEventBatch(np.arange(3, dtype=np.uint64), np.zeros(3, np.uint8),
                                                       np.zeros(3, np.uint8))),
    EngineDead("the engine step loop failed"),
    InitWorker({"rank": 1}),
    InitRunner(4096, 0),
    WorkerStep({"arrays": 1}, [0, 2], None, None, None),
    StopWorker(),
    WorkerLoaded(1),
    WorkerReady(1, 900),
    WorkerReady(1, 900, 41001),
    WorkerError("RuntimeError: x", "Traceback ..."),
    WorkerPDGrant(7, [3, 4]),
    WorkerPDRevoke(7),
    WorkerPDPush(7, [["127.0.0.1", 41001, 2, 0, 2]], [0, 1], [5, 6], 20, True),
    WorkerPDAck(1, 7),
    WorkerPDPushed(1, 7, "", 4096),
]


def _same(a, b) -> bool:
    return repr(a) == repr(b)  # exceptions and numpy arrays do not compare by value


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_a_frame(message):
    (received,) = FrameReader().feed(encode_frame(message))
    assert type(received) is type(message)
    assert _same(received, message)


def test_output_deltas_decode_after_the_round_trip():
    (received,) = FrameReader().feed(encode_frame(StepOutputs([], _deltas(), stats_to_wire(STATS), [], None)))
    outputs = OutputDeltaDecoder().decode(received.deltas)
    assert stats_from_wire(received.stats) == STATS
    assert [o.request_id for o in outputs] == ["a", "b"]
    assert [s.text for s in outputs[1].outputs] == ["b0", "b1"] and outputs[1].prompt == "prompt b"
    assert outputs[0].finished and not outputs[1].finished
    assert outputs[1].prompt_logprobs == [None, {2: -0.5}]


def _frame_of(wire) -> bytes:
    payload = pickle.dumps(wire)
    return struct.pack("<Q", len(payload)) + payload


@pytest.mark.parametrize("wire, error", [
    (("NoSuchMessage", 1), "unknown message 'NoSuchMessage'"),
    (["AbortRequest", "r"], "expected a (name, *fields) tuple, got list"),
    (("AbortRequest",), "AbortRequest: expected 1 fields ('request_id',), got 0"),
    (("AddRequest", 1, "r", "p", None, 1.0, True), "AddRequest: expected 7 fields"),
    (("AddRequest", 1, 42, "p", None, 1.0, True, False), "AddRequest.request_id: expected str, got int"),
    (("AddRequest", "1", "r", "p", None, 1.0, True, False), "AddRequest.tag: expected int, got str"),
    (("WorkerReady", 1, None, 0), "WorkerReady.num_blocks: expected int, got NoneType"),
    (("StepOutputs", [], ("Nope",), None, [], None), "unknown message 'Nope'"),
])
def test_a_malformed_message_names_the_message_and_field(wire, error):
    with pytest.raises(MalformedMessage, match=None) as caught:
        FrameReader().feed(_frame_of(wire))
    assert error in str(caught.value)
    with pytest.raises(MalformedMessage):
        from_wire(wire)


def test_a_frame_that_is_not_a_pickle_is_malformed():
    garbage = b"\x80\x05not a pickle at all"
    with pytest.raises(MalformedMessage, match="cannot unpickle"):
        FrameReader().feed(struct.pack("<Q", len(garbage)) + garbage)


def test_only_registered_messages_are_sent():
    with pytest.raises(TypeError, match="tuple is not a registered message class"):
        encode_frame(("step", [], [], None, [], None))


@pytest.mark.parametrize("spoil, column", [
    (lambda d: (d.new_token_ids.pop(), d.texts.pop(2)),
     "OutputDeltas.new_token_ids: fewer entries than the requests' samples"),
    (lambda d: d.new_token_ids.pop(), "OutputDeltas.texts: positions outside the 2 samples"),
    (lambda d: d.new_token_ids.append([1]), "OutputDeltas.new_token_ids: 4 entries for 3 samples"),
    (lambda d: d.last_token_time.pop(), "OutputDeltas.last_token_time: 1 entries for 2 requests"),
    (lambda d: setattr(d, "texts", [(0, "x")]), "OutputDeltas.texts: expected a dict or None, got list"),
    (lambda d: (d.finishes.__setitem__(9, ("stop", None)), d.new_token_ids.pop(), d.texts.pop(2)),
     "OutputDeltas.finishes: positions outside the 2 samples"),
    (lambda d: d.times.pop("b"), "OutputDeltas.times: the new request 'b' has none"),
    (lambda d: d.texts.__setitem__(1, "not a pair"), "OutputDeltas: cannot be decoded"),
])
def test_output_deltas_with_a_bad_column_name_it(spoil, column):
    deltas = _deltas()
    spoil(deltas)
    (received,) = FrameReader().feed(encode_frame(StepOutputs([], deltas, STATS, [], None)))
    with pytest.raises(MalformedMessage) as caught:
        OutputDeltaDecoder().decode(received.deltas)
    assert column in str(caught.value)


def test_output_deltas_of_an_unknown_request_are_malformed():
    deltas = _deltas()
    deltas.headers.clear()
    with pytest.raises(MalformedMessage, match="'a' has no header and is not running"):
        OutputDeltaDecoder().decode(deltas)


def test_the_wire_form_is_the_name_and_the_fields():
    assert to_wire(AbortRequest("r")) == ("AbortRequest", "r")
    assert to_wire(StopEngine()) == ("StopEngine",)
    assert from_wire(("WorkerReady", 2, 10, 0)) == WorkerReady(2, 10)


def test_a_malformed_frame_from_the_engine_process_fails_its_requests():
    """The server side of the link: the waiting request fails with EngineDeadError naming the bad
    message (no hang, no misread), and the engine process is ended."""
    import asyncio
    import socket
    import subprocess
    import sys

    from rtpllm.engine.async_engine import EngineDeadError
    from rtpllm.engine.link.process_engine import ProcessEngine

    server_end, engine_end = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    engine = ProcessEngine(process, server_end, EngineInfo("m", 128, 1000, STATS), tokenizer=object())  # decodes nothing

    async def main():
        engine.start()
        added = engine.add_request("r", [1, 2], SamplingParams(max_tokens=2), stream=False)
        engine_end.sendall(_frame_of(("AddRequest", 1)))  # not what an engine sends, and short
        with pytest.raises(EngineDeadError, match="AddRequest: expected 7 fields"):
            await asyncio.wait_for(added, 10)

    try:
        asyncio.run(main())
        assert process.wait(timeout=10) != 0  # killed
    finally:
        engine.close()
        engine_end.close()


def test_stats_travel_as_a_tuple_and_come_back_equal():
    from rtpllm.engine.stats import KVTierSnapshot
    from rtpllm.spec.stats import SpecCounters

    tier = KVTierSnapshot("host", 1, 2, 3, 4, 5, 6, 7, 0, 8, 100, 9, True, 4096, (1, 2, 3), 0.5, 3, skipped_blocks=1)
    full = EngineStats(1, 2, 3, 40, 5, 6, 0, 7, 8, spec=SpecCounters("ngram", 1, 2, 3, 1), num_waiting_for_kv=1,
                       kv_tier_hit_tokens=16, kv_tiers=(tier, tier), pd=(("decode", "ok", 3),))
    for stats in (STATS, full):
        wire = stats_to_wire(stats)
        assert type(wire) is tuple and pickle.loads(pickle.dumps(wire)) == wire
        assert stats_from_wire(pickle.loads(pickle.dumps(wire))) == stats
    for bad in (STATS, (1, 2), stats_to_wire(full)[:-2] + ((("not", "a", "tier"),), ())):
        with pytest.raises(MalformedMessage, match="StepOutputs.stats"):
            stats_from_wire(bad)
