"""Serving metrics from per-request results, with `vllm bench serve`'s definitions so numbers compare.

- request/output/total token throughput: completed requests, output tokens, and prompt plus output
  tokens, divided by the benchmark's wall-clock duration;
- TTFT and end-to-end latency per request; TPOT = (latency - TTFT) / (output_tokens - 1) per request
  with more than one output token; ITL pooled over all chunk gaps of all requests;
- goodput: completed requests per second that met every given SLO (ttft, tpot, e2el, in ms).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from rtpllm.benchmarks.request_client import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[str, float] = field(default_factory=dict)  # "p99" -> value

    @classmethod
    def of(cls, values_s: list[float], percentiles: list[float]) -> "Distribution":
        values = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
        return cls(mean=float(values.mean()), median=float(np.median(values)), std=float(values.std()),
                   percentiles={_label(p): float(np.percentile(values, p)) for p in percentiles})


@dataclass
class ServeMetrics:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: Optional[float]
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float  # the busiest second of the run
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution

    def to_dict(self) -> dict:
        return asdict(self)


def parse_goodput(specs: Optional[list[str]]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 0.5, "tpot": 0.05} (milliseconds in, seconds out)."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput: expected NAME:MILLISECONDS with NAME in {SLO_METRICS}, got {spec!r}")
        try:
            limit_ms = float(value)
        except ValueError as exc:
            raise ValueError(f"goodput: {spec!r} has no number of milliseconds") from exc
        if limit_ms < 0:
            raise ValueError(f"goodput: {spec!r} must not be negative")
        slos[name] = limit_ms / 1000.0
    return slos


def output_token_counts(results: list[RequestResult], tokenizer) -> list[int]:
    """Output tokens per request: the server's usage when it sent one, else the tokenized text."""
    counts = []
    for result in results:
        if not result.success:
            counts.append(0)
        elif result.output_tokens is not None:
            counts.append(result.output_tokens)
        else:
            counts.append(len(tokenizer.encode(result.generated_text, add_special_tokens=False)))
    return counts


def calculate_metrics(results: list[RequestResult], output_lens: list[int], duration_s: float,
                      percentiles: list[float], goodput_slos: Optional[dict[str, float]] = None) -> ServeMetrics:
    ttfts, tpots, e2els, itls = [], [], [], []
    completed = good = total_input = total_output = 0
    for result, output_len in zip(results, output_lens):
        if not result.success:
            continue
        completed += 1
        total_input += result.prompt_len
        total_output += output_len
        tpot = (result.latency - result.ttft) / (output_len - 1) if output_len > 1 else 0.0
        if output_len > 1:
            tpots.append(tpot)
        ttfts.append(result.ttft)
        e2els.append(result.latency)
        itls.extend(result.itl)
        if goodput_slos:
            observed = {"ttft": result.ttft, "tpot": tpot, "e2el": result.latency}
            good += all(observed[name] <= limit for name, limit in goodput_slos.items())
    duration_s = max(duration_s, 1e-9)
    return ServeMetrics(
        duration_s=duration_s, completed=completed, failed=len(results) - completed,
        total_input_tokens=total_input, total_output_tokens=total_output,
        request_throughput=completed / duration_s,
        request_goodput=good / duration_s if goodput_slos else None,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=_peak_output_rate(results, output_lens),
        ttft_ms=Distribution.of(ttfts, percentiles), tpot_ms=Distribution.of(tpots, percentiles),
        itl_ms=Distribution.of(itls, percentiles), e2el_ms=Distribution.of(e2els, percentiles))


def output_token_timeline(results: list[RequestResult], output_lens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk times, tokens in each chunk), each request's tokens spread evenly over its chunks."""
    times, tokens = [], []
    for result, output_len in zip(results, output_lens):
        if result.success and result.chunk_times:
            times.extend(result.chunk_times)
            tokens.extend([output_len / len(result.chunk_times)] * len(result.chunk_times))
    return np.asarray(times, dtype=np.float64), np.asarray(tokens, dtype=np.float64)


def _peak_output_rate(results: list[RequestResult], output_lens: list[int]) -> float:
    times, tokens = output_token_timeline(results, output_lens)
    if times.size == 0:
        return 0.0
    seconds = np.floor(times - times.min()).astype(np.int64)
    return float(np.bincount(seconds, weights=tokens).max())


def _label(percentile: float) -> str:
    return f"p{percentile:g}"
