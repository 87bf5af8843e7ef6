"""Synthetic prompts of controlled lengths: `random` (vLLM's) and `prefix` (shared system prompts).

Both draw random ordinary tokens and send them as text, so any OpenAI-compatible server (with the
same tokenizer) sees the same prompt lengths.
"""

from __future__ import annotations

import random

from rtpllm.benchmarks.datasets.base import RandomText, SampleRequest


def _length_range(mean: int, range_ratio: float, name: str) -> tuple[int, int]:
    if mean < 1:
        raise ValueError(f"{name}: must be >= 1, got {mean}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random-range-ratio: must be in [0, 1), got {range_ratio}")
    return max(1, int(mean * (1 - range_ratio))), int(mean * (1 + range_ratio))


def sample_random(tokenizer, num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                  prefix_len: int = 0, seed: int = 0) -> list[SampleRequest]:
    """Prompts of `prefix_len` shared random tokens plus a random part whose length is drawn
    uniformly from input_len * [1 - range_ratio, 1 + range_ratio]; output lengths likewise."""
    in_low, in_high = _length_range(input_len, range_ratio, "random-input-len")
    out_low, out_high = _length_range(output_len, range_ratio, "random-output-len")
    rng = random.Random(seed)
    texts = RandomText(tokenizer, rng)
    prefix, prefix_tokens = texts.make(prefix_len)
    requests = []
    for _ in range(num_requests):
        text, length = texts.make(rng.randint(in_low, in_high))
        requests.append(SampleRequest(prefix + text, prefix_tokens + length, rng.randint(out_low, out_high)))
    return requests


def sample_shared_prefix(tokenizer, num_groups: int, prompts_per_group: int, prefix_len: int, suffix_len: int,
                         output_len: int, seed: int = 0) -> list[SampleRequest]:
    """`num_groups` long system prompts, each followed by `prompts_per_group` different questions,
    shuffled together so that cache reuse has to survive interleaving, as in real traffic."""
    for name, value in (("prefix-num-groups", num_groups), ("prefix-prompts-per-group", prompts_per_group),
                        ("prefix-len", prefix_len), ("prefix-suffix-len", suffix_len),
                        ("prefix-output-len", output_len)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    rng = random.Random(seed)
    texts = RandomText(tokenizer, rng)
    requests = []
    for _ in range(num_groups):
        prefix, prefix_tokens = texts.make(prefix_len)
        for _ in range(prompts_per_group):
            suffix, suffix_tokens = texts.make(suffix_len)
            requests.append(SampleRequest(prefix + suffix, prefix_tokens + suffix_tokens, output_len))
    rng.shuffle(requests)
    return requests
