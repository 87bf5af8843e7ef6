"""Shared plumbing for the GPU benchmarks: timing, the measured copy ceiling, and the JSON that
bench/gpu/run_all.sh collects into its summary table.

A benchmark script takes `--json PATH` and writes
    {"bench": str, "device": str, "rows": [{"name": str, "value": float, "unit": str,
                                            "ceiling": str, "ratio": float | None, ...}]}
where `ratio` is value / ceiling (e.g. achieved over copy bandwidth). Extra keys are kept.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import time
import urllib.request
from typing import Callable, Optional, Sequence

import torch

# Measured on this workplace's H100 (docs: /work/shared/GPU.md); the benchmarks also re-measure
# the copy bandwidth in the same run and report both.
H100_COPY_TBPS = 3.02


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="headline configurations only")
    return parser.parse_args()


def device_name() -> str:
    return torch.cuda.get_device_name()


def time_us(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median time of one call in microseconds, L2 flushed before every call (so repeated runs
    over one buffer measure DRAM, not the cache). Uses triton.testing.do_bench when present."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_us_with_events(fn, warmup_ms, rep_ms)
    return 1000.0 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def _time_us_with_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate_ms))):
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1000.0 * statistics.median(times)


def time_in_graph_us(fns: Sequence[Callable[[], object]], launches: int = 0, replays: int = 20) -> float:
    """Median device time of one launch, measured as back-to-back launches inside a CUDA graph,
    as the model runs them (no Python or launch gaps between kernels).

    `fns` are the same operation over distinct input copies; cycling through them keeps the L2
    cache cold when the copies together are much larger than it (see `copies_for_cold_l2`).
    """
    launches = max(launches, 2 * len(fns), 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # warm-up (and allocator activity) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fns[i % len(fns)]()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1000.0 * statistics.median(times) / launches


def copies_for_cold_l2(bytes_per_copy: int, max_copies: int = 32) -> int:
    """How many input copies to cycle through so that each launch finds its inputs out of L2."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(max_copies, -(-4 * l2_bytes // max(bytes_per_copy, 1))))


def measure_copy_tbps(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randint(0, 127, (num_bytes,), dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / (us * 1e-6) / 1e12


def row(name: str, value: float, unit: str, ceiling: str, ratio: Optional[float], **extra) -> dict:
    return {"name": name, "value": value, "unit": unit, "ceiling": ceiling, "ratio": ratio, **extra}


def write_json(path: Optional[str], bench: str, rows: list[dict], **extra) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"bench": bench, "device": device_name(), "rows": rows, **extra}, f, indent=1)


# ---------------------------------------------------------------- servers the benchmarks start
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not become healthy within {timeout_s:.0f} s")
