"""What the server <-> engine-process link costs per step, without a model or a socket.

Engine side (what engine_core.py does after a step): `OutputDeltaEncoder.encode` of the requests
the step moved and the engine's stats in wire form, then `encode_frame` of the step's StepOutputs
message; server side (process_engine.py): `FrameReader.feed` of that frame, then
`OutputDeltaDecoder.decode` back into RequestOutputs (the stats are decoded only when read). Every request gains one token per step (a
stream). Prints CPU microseconds per step and per token (process time, so that other processes on a
busy machine do not count), the best of --repeats runs.

Usage: python bench/serving/link_frames.py [--requests 1 64 256] [--steps 100] [--repeats 7] [--no-gc]
"""

from __future__ import annotations

import argparse
import gc
import time

from rtpllm.engine.link.frames import FrameReader, encode_frame
from rtpllm.engine.link.messages import StepOutputs
from rtpllm.engine.link.output_deltas import OutputDeltaDecoder, OutputDeltaEncoder
from rtpllm.engine.link.stats_wire import stats_to_wire
from rtpllm.engine.request_state import RequestGroup, SequenceState
from rtpllm.engine.stats import EngineStats
from rtpllm.outputs import RequestMetrics
from rtpllm.sampling_params import SamplingParams


def make_groups(num_requests: int, logprobs: bool) -> list[RequestGroup]:
    params = SamplingParams()
    groups = []
    for r in range(num_requests):
        group = RequestGroup(f"cmpl-{r:08d}", None, list(range(32)), params, RequestMetrics(1.0, 2.0, 3.0))
        group.seqs.append(SequenceState(r, 0, group, params, None, None, None, logprobs=[] if logprobs else None))
        groups.append(group)
    return groups


def run_once(num_requests: int, steps: int, logprobs: bool) -> tuple[float, float, int]:
    """(engine-side us per step, server-side us per step, frame bytes per step)."""
    groups = make_groups(num_requests, logprobs)
    encoder, decoder, reader = OutputDeltaEncoder(), OutputDeltaDecoder(), FrameReader()
    stats = EngineStats(num_requests, 0, 100, 1000, 5, 3, 0, 32 * num_requests, 0)
    engine_s = server_s = 0.0
    num_bytes = 0
    for step in range(steps):
        for group in groups:  # what the engine's step did: one token more per request
            seq = group.seqs[0]
            seq.output_ids.append(1000 + step)
            seq.visible_text += " tok"
            if seq.logprobs is not None:
                seq.logprobs.append({1000 + step: -0.5})
                seq.cumulative_logprob -= 0.5
            group.metrics.last_token_time = 4.0 + step
        start = time.process_time()
        frame = encode_frame(StepOutputs([], encoder.encode(groups), stats_to_wire(stats), [], None))
        middle = time.process_time()
        (message,) = reader.feed(frame)
        outputs = decoder.decode(message.deltas)
        end = time.process_time()
        assert len(outputs) == num_requests
        engine_s += middle - start
        server_s += end - middle
        num_bytes += len(frame)
    return 1e6 * engine_s / steps, 1e6 * server_s / steps, num_bytes // steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-gc", action="store_true", help="disable the garbage collector (steadier numbers)")
    args = parser.parse_args()
    if args.no_gc:
        gc.disable()
    for logprobs in (False, True):
        for num_requests in args.requests:
            runs = [run_once(num_requests, args.steps, logprobs) for _ in range(args.repeats)]
            engine_us = min(r[0] for r in runs)
            server_us = min(r[1] for r in runs)
            print(f"requests {num_requests:4d} logprobs {logprobs!s:5}: engine side {engine_us:8.1f} us/step, "
                  f"server side {server_us:8.1f} us/step, {(engine_us + server_us) / num_requests:6.2f} us/token, "
                  f"frame {runs[0][2]} B")


if __name__ == "__main__":
    main()
