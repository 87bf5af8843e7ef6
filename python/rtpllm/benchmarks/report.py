"""Benchmark results as a table on stdout and as a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rtpllm.benchmarks.serve_metrics import Distribution, ServeMetrics

_WIDTH = 50


def _title(text: str, fill: str = "-") -> str:
    return f"{text:{fill}^{_WIDTH}}"


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40} {value:<10}"


def format_serve_table(metrics: ServeMetrics, header: dict[str, Any]) -> str:
    lines = [_title(" Serving Benchmark Result ", "=")]
    lines += [_row(f"{name}:", value) for name, value in header.items()]
    lines += [
        _row("Successful requests:", metrics.completed),
        _row("Failed requests:", metrics.failed),
        _row("Benchmark duration (s):", metrics.duration_s),
        _row("Total input tokens:", metrics.total_input_tokens),
        _row("Total generated tokens:", metrics.total_output_tokens),
        _row("Request throughput (req/s):", metrics.request_throughput),
    ]
    if metrics.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", metrics.request_goodput))
    lines += [
        _row("Output token throughput (tok/s):", metrics.output_throughput),
        _row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s),
        _row("Total token throughput (tok/s):", metrics.total_token_throughput),
    ]
    sections = (("Time to First Token", "TTFT", metrics.ttft_ms),
                ("Time per Output Token (excl. 1st token)", "TPOT", metrics.tpot_ms),
                ("Inter-token Latency", "ITL", metrics.itl_ms),
                ("End-to-end Latency", "E2EL", metrics.e2el_ms))
    for title, short, dist in sections:
        lines.append(_title(title))
        lines += _distribution_rows(short, dist)
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _distribution_rows(short: str, dist: Distribution) -> list[str]:
    rows = [_row(f"Mean {short} (ms):", dist.mean), _row(f"Median {short} (ms):", dist.median)]
    rows += [_row(f"{label.upper()} {short} (ms):", value) for label, value in dist.percentiles.items()]
    return rows


def write_json(path: Optional[Path], result: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
