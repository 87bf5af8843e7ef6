"""`rtpllm bench throughput`: offline throughput, every prompt submitted at once through `LLM`.

The engine sees the whole dataset up front, so this is the ceiling a server running the same
requests can approach; `bench serve` against `rtpllm serve` with the same dataset options shows
what the HTTP layer costs.
"""

from __future__ import annotations

import argparse
import logging
import time

from rtpllm.benchmarks.datasets import add_dataset_args, load_requests
from rtpllm.benchmarks.report import write_json
from rtpllm.engine.gc_heap import freeze_startup_heap
from rtpllm.serving.engine_args import add_engine_args

logger = logging.getLogger(__name__)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)  # provides --seed, used for the dataset too
    add_dataset_args(parser, with_seed=False)
    group = parser.add_argument_group("run")
    group.add_argument("--num-warmups", type=int, default=1, help="Prompts generated (and not counted) first.")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--output-json", default=None, help="Write the results to this JSON file.")
    group.add_argument("--disable-tqdm", action="store_true")


def main(args: argparse.Namespace) -> int:
    from rtpllm.engine.llm import LLM
    from rtpllm.sampling_params import SamplingParams
    from rtpllm.serving.engine_args import engine_kwargs_from_args

    llm = LLM(model=args.model, **engine_kwargs_from_args(args))
    freeze_startup_heap()  # as `rtpllm serve` does: the collector stays off the model and tokenizer
    requests = load_requests(args, llm.get_tokenizer())
    if any(r.next_turns for r in requests):
        raise ValueError("dataset-name: multi-turn needs a server (use `rtpllm bench serve`)")
    # Exactly the dataset's output lengths, as `bench serve --ignore-eos` asks of a server.
    params = [SamplingParams(max_tokens=r.expected_output_len, ignore_eos=True, temperature=args.temperature)
              for r in requests]
    prompts = [r.prompt for r in requests]
    if args.num_warmups > 0:
        llm.generate(prompts[:args.num_warmups], params[:args.num_warmups])

    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start

    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {"elapsed_time": elapsed, "num_requests": len(outputs), "total_num_tokens": prompt_tokens + output_tokens,
              "total_output_tokens": output_tokens, "requests_per_second": len(outputs) / elapsed,
              "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
              "output_tokens_per_second": output_tokens / elapsed}
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} "
          f"total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s "
          f"({len(outputs)} requests, {prompt_tokens} prompt + {output_tokens} output tokens in {elapsed:.2f} s)")
    write_json(args.output_json, result)
    return 0
