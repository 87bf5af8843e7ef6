"""`rtpllm bench latency`: the latency of one fixed batch (input and output lengths fixed), over
repeated iterations, through `LLM`. Each iteration draws fresh random prompts so that the prefix
cache cannot turn later iterations into cache hits."""

from __future__ import annotations

import argparse
import time

import numpy as np

from rtpllm.benchmarks.report import write_json
from rtpllm.engine.gc_heap import freeze_startup_heap
from rtpllm.serving.engine_args import add_engine_args

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    group = parser.add_argument_group("run")
    group.add_argument("--input-len", type=int, default=32, help="Prompt tokens per sequence.")
    group.add_argument("--output-len", type=int, default=128, help="Generated tokens per sequence.")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--num-iters-warmup", type=int, default=3)
    group.add_argument("--num-iters", type=int, default=10)
    group.add_argument("--output-json", default=None, help="Write the results to this JSON file.")


def _check(args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.num_iters_warmup < 0:
        raise ValueError(f"num-iters-warmup: must be >= 0, got {args.num_iters_warmup}")


def main(args: argparse.Namespace) -> int:
    from rtpllm.engine.llm import LLM
    from rtpllm.sampling_params import SamplingParams
    from rtpllm.serving.engine_args import engine_kwargs_from_args

    _check(args)
    llm = LLM(model=args.model, **engine_kwargs_from_args(args))
    freeze_startup_heap()  # as `rtpllm serve` does: the collector stays off the model and tokenizer
    tokenizer = llm.get_tokenizer()
    ordinary = np.setdiff1d(np.arange(len(tokenizer)), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    rng = np.random.default_rng(args.seed or 0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0)

    def one_iteration() -> tuple[float, float]:
        prompts = [rng.choice(ordinary, size=args.input_len).tolist() for _ in range(args.batch_size)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        latency = time.perf_counter() - start
        ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs if o.metrics is not None]
        return latency, float(np.mean(ttfts)) if ttfts else float("nan")

    for _ in range(args.num_iters_warmup):
        one_iteration()
    runs = [one_iteration() for _ in range(args.num_iters)]
    latencies = np.array([latency for latency, _ in runs])
    ttfts = np.array([ttft for _, ttft in runs])
    percentiles = {f"p{p}": float(np.percentile(latencies, p)) for p in PERCENTILES}
    print(f"Batch {args.batch_size} x ({args.input_len} in, {args.output_len} out), {args.num_iters} iterations:")
    print(f"Avg latency: {latencies.mean() * 1000:.3f} ms   Avg engine TTFT: {np.nanmean(ttfts) * 1000:.3f} ms")
    for label, value in percentiles.items():
        print(f"{label.upper():>4} latency: {value * 1000:.3f} ms")
    write_json(args.output_json, {"avg_latency": float(latencies.mean()), "latencies": latencies.tolist(),
                                  "percentiles": percentiles, "avg_engine_ttft": float(np.nanmean(ttfts))})
    return 0
