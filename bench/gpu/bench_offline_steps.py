"""Where an offline run's wall time goes, step by step, under different scheduler limits.

Runs N random 1024/128 requests (the prefill-heavy workload of the throughput target) through
`LLM` on the Llama-3.1-8B-shaped checkpoint of bench_e2e_llama8b.py, once per configuration in
OFFLINE_CONFIGS ("max_num_batched_tokens/max_num_seqs[/nosplit]", space-separated; "nosplit"
runs a mixed step's decodes through the prefill kernel, as before the decode split). Every
`ModelRunner.execute` call is bracketed with CUDA events, so without a profiler's overhead the
run splits into the time before the first step (adding the requests: tokenization), device time of decode-only
steps, device time of steps with prefill tokens, device idle between steps (the host's part:
scheduling, reading tokens back, bookkeeping), and what is left after the last step.
A step's device time includes stalls inside it (an eager step whose launches fall behind).

Usage: python3 bench/gpu/bench_offline_steps.py [--json PATH] [--quick]
Env:   OFFLINE_CONFIGS (default "8192/256 8192/384 8192/512": the sequence limits around the best
       measured, H100 2026-11-27), OFFLINE_REQUESTS (1000).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e_llama8b import VLLM, checkpoint_dir  # noqa: E402
from bench_util import device_name, parse_args, write_json  # noqa: E402

from rtpllm import LLM, SamplingParams  # noqa: E402
from rtpllm.benchmarks.datasets import sample_random  # noqa: E402


@dataclass
class StepRecord:
    decode_only: bool
    num_seqs: int
    num_tokens: int
    host_ms: float  # inside execute(): input copies, launches (eager steps), sampling launch
    host_start: float  # perf_counter() when execute() was called
    start: torch.cuda.Event
    end: torch.cuda.Event


class StepTimeline:
    """Wraps `runner.execute` to bracket every step with CUDA events."""

    def __init__(self, runner, split_decodes: bool):
        self.records: list[StepRecord] = []
        self._execute = runner.execute
        self._build_metadata = runner.build_metadata
        runner.execute = self._timed
        if not split_decodes:
            runner.build_metadata = self._without_split

    def _without_split(self, batch):
        meta = self._build_metadata(batch)
        meta.num_decodes = 0
        return meta

    def _timed(self, batch, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        result = self._execute(batch, *args, **kwargs)
        end.record()
        self.records.append(StepRecord(int(batch.max_query_len) == 1, int(batch.num_seqs),
                                       len(batch.input_token_ids), (time.perf_counter() - t0) * 1e3, t0,
                                       start, end))
        return result

    def summary(self, started: float, wall_s: float) -> dict:
        """`started`: perf_counter() when generate() was called (its requests are added before
        the first step: tokenization and queueing)."""
        torch.cuda.synchronize()
        sums = {"decode": 0.0, "prefill": 0.0}
        counts = {"decode": 0, "prefill": 0}
        host = {"decode": 0.0, "prefill": 0.0}
        idle_ms = 0.0
        for i, r in enumerate(self.records):
            kind = "decode" if r.decode_only else "prefill"
            sums[kind] += r.start.elapsed_time(r.end)
            counts[kind] += 1
            host[kind] += r.host_ms
            if i + 1 < len(self.records):
                idle_ms += max(0.0, r.end.elapsed_time(self.records[i + 1].start))
        tokens = [r.num_tokens for r in self.records if not r.decode_only]
        seqs = [r.num_seqs for r in self.records if r.decode_only]
        before = self.records[0].host_start - started
        device = (sums["decode"] + sums["prefill"] + idle_ms) / 1e3
        return {
            "wall_s": wall_s, "before_first_step_s": before, "after_steps_s": wall_s - before - device,
            "steps_decode": counts["decode"], "steps_prefill": counts["prefill"],
            "device_decode_s": sums["decode"] / 1e3, "device_prefill_s": sums["prefill"] / 1e3,
            "idle_between_steps_s": idle_ms / 1e3,
            "host_in_execute_decode_ms": host["decode"] / max(counts["decode"], 1),
            "host_in_execute_prefill_ms": host["prefill"] / max(counts["prefill"], 1),
            "mean_decode_batch": sum(seqs) / max(len(seqs), 1),
            "mean_prefill_step_tokens": sum(tokens) / max(len(tokens), 1),
        }


def run_config(path, spec: str, num: int) -> dict:
    parts = spec.split("/")
    tokens, seqs, split = int(parts[0]), int(parts[1]), "nosplit" not in parts
    llm = LLM(model=str(path), max_model_len=4096, max_num_seqs=seqs, max_num_batched_tokens=tokens)
    requests = sample_random(llm.get_tokenizer(), num, 1024, 128, 0.0, 0, 0)
    params = [SamplingParams(max_tokens=r.expected_output_len, ignore_eos=True, temperature=1.0) for r in requests]
    prompts = [r.prompt for r in requests]
    llm.generate(prompts[:8], params[:8])  # warm-up
    timeline = StepTimeline(llm.engine.runner, split)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    result = {"config": spec, "rps": len(outputs) / wall, **timeline.summary(start, wall)}
    del llm, timeline
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args(__doc__)
    card = device_name()
    ref = VLLM["H200" if "H200" in card else "H100"]["random_rps"]
    num = int(os.environ.get("OFFLINE_REQUESTS", 300 if args.quick else 1000))
    configs = os.environ.get("OFFLINE_CONFIGS", "8192/256 8192/384 8192/512").split()
    path = checkpoint_dir()
    rows = []
    for spec in configs:
        r = run_config(path, spec, num)
        print(f"[{card}] random 1024/128 x{num} {spec}: {r['rps']:.2f} req/s ({r['rps'] / ref:.3f} of vLLM {ref}); "
              f"wall {r['wall_s']:.1f} s = before the first step {r['before_first_step_s']:.2f} s + decode steps {r['device_decode_s']:.1f} s ({r['steps_decode']}, "
              f"mean batch {r['mean_decode_batch']:.0f}) + prefill steps {r['device_prefill_s']:.1f} s "
              f"({r['steps_prefill']}, mean {r['mean_prefill_step_tokens']:.0f} tokens) + idle between steps "
              f"{r['idle_between_steps_s']:.1f} s + after {r['after_steps_s']:.2f} s; host in execute {r['host_in_execute_decode_ms']:.2f} / "
              f"{r['host_in_execute_prefill_ms']:.2f} ms per decode / prefill step", flush=True)
        rows.append(dict(name=f"random 1024/128 x{num}, {spec}", value=r["rps"], unit="req/s",
                         ceiling=f"vLLM 0.26 {ref}", ratio=r["rps"] / ref, **r))
    write_json(args.json, "offline_steps", rows)


if __name__ == "__main__":
    main()
