"""`rtpllm router` on one GPU: several instances of a Llama-3.2-1B-shaped random checkpoint, each
with its share of the GPU's memory, behind the router; a multi-tenant trace replayed at one fixed
request rate under each policy (cache_aware, round_robin, least_loaded). Reports client-side TTFT
p50/p95 and the instances' prefix-cache hit rate per policy, and cache_aware's against
round_robin's (goals: TTFT p95 <= 0.65x, hit rate >= 2x).

The trace (the same arrival times and lengths for every policy; token contents salted per policy,
so no run reuses another's cache, and the previous run's blocks, oldest in the LRU, go first):
- tenant groups, each with a system prompt shared by its conversations;
- multi-turn conversations: turn k's prompt is turn k-1's prompt + a reply + a new user message,
  so its history is cached wherever turn k-1 ran;
- a share of long one-off prompts (over the router's long-prompt threshold: the long lane).
Prompts are token ids (the completions API), so that their lengths are exact.

    python bench/gpu/bench_router.py [--json out.json] [--quick]     # H100: about 5 minutes
    python bench/gpu/bench_router.py --cpu-smoke                     # a tiny model on the CPU, ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import aiohttp

POLICIES = ("cache_aware", "round_robin", "least_loaded")
SHAPE = "llama-3.2-1b"


@dataclass(frozen=True)
class TraceShape:
    duration_s: float
    rate: float  # requests per second (Poisson arrivals)
    groups: int
    system_tokens: int
    turns: int
    user_tokens: tuple[int, int]  # new user message length range
    reply_tokens: int  # synthetic assistant reply placed into the history
    turn_gap_s: tuple[float, float]  # between a conversation's turns
    long_share: float
    long_tokens: tuple[int, int]
    max_tokens: int  # generated per request
    vocab: int


GPU_TRACE = TraceShape(duration_s=60, rate=10.0, groups=16, system_tokens=256, turns=6, user_tokens=(200, 600),
                       reply_tokens=200, turn_gap_s=(2.0, 6.0), long_share=0.1, long_tokens=(6000, 9000),
                       max_tokens=32, vocab=128000)
CPU_TRACE = TraceShape(duration_s=10, rate=3.0, groups=3, system_tokens=64, turns=3, user_tokens=(16, 48),
                       reply_tokens=16, turn_gap_s=(0.5, 1.5), long_share=0.1, long_tokens=(300, 400),
                       max_tokens=4, vocab=1000)


@dataclass
class TraceRequest:
    at_s: float
    tokens: list[int]
    kind: str  # "turn" or "long"


@dataclass
class Result:
    ttft_s: Optional[float]
    ok: bool
    kind: str
    error: str = ""


@dataclass
class RunReport:
    policy: str
    results: list[Result] = field(default_factory=list)
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    wall_s: float = 0.0

    def ttft(self, q: float, kind: Optional[str] = None) -> float:
        # A request still without its first token when the run was cut off counts as infinitely late.
        values = sorted(r.ttft_s if r.ttft_s is not None else float("inf") for r in self.results
                        if (r.ok or r.error == "cut off") and (kind is None or r.kind == kind))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def build_trace(shape: TraceShape, seed: int, salt: int) -> list[TraceRequest]:
    """Arrival times and lengths depend on `seed` only; token contents also on `salt`."""
    timing = random.Random(seed)
    content = random.Random(seed * 7919 + salt)

    def tokens(n: int) -> list[int]:
        return [content.randrange(10, shape.vocab) for _ in range(n)]

    systems = [tokens(shape.system_tokens) for _ in range(shape.groups)]
    # Sessions (a conversation, or one long prompt) arrive as a Poisson process whose rate makes the
    # requests, turns included, arrive at `shape.rate` on average.
    per_session = shape.long_share + (1 - shape.long_share) * shape.turns
    requests: list[TraceRequest] = []
    t = 0.0
    while True:
        t += timing.expovariate(shape.rate / per_session)
        if t >= shape.duration_s:
            break
        if timing.random() < shape.long_share:
            requests.append(TraceRequest(t, tokens(timing.randint(*shape.long_tokens)), "long"))
            continue
        prompt = systems[timing.randrange(shape.groups)] + tokens(timing.randint(*shape.user_tokens))
        at = t
        for _ in range(shape.turns):
            if at >= shape.duration_s:
                break
            requests.append(TraceRequest(at, list(prompt), "turn"))
            prompt += tokens(shape.reply_tokens) + tokens(timing.randint(*shape.user_tokens))
            at += timing.uniform(*shape.turn_gap_s)
    return sorted(requests, key=lambda r: r.at_s)


async def replay(url: str, model: str, trace: list[TraceRequest], max_tokens: int, drain_s: float) -> list[Result]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        first_tokens: dict[int, float] = {}

        async def one(index: int, request: TraceRequest) -> Result:
            body = {"model": model, "prompt": request.tokens, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True}
            start = time.perf_counter()
            ttft = None
            try:
                async with session.post(url + "/v1/completions", json=body) as response:
                    if response.status != 200:
                        return Result(None, False, request.kind, f"HTTP {response.status}: {await response.text()}")
                    async for line in response.content:
                        if ttft is None and line.startswith(b"data: {"):
                            ttft = first_tokens[index] = time.perf_counter() - start
                        if line.startswith(b'data: {"error"'):
                            return Result(None, False, request.kind, line.decode()[:200])
                return Result(ttft, ttft is not None, request.kind)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return Result(None, False, request.kind, repr(exc))

        origin = time.perf_counter()
        tasks = []
        for index, request in enumerate(trace):
            delay = request.at_s - (time.perf_counter() - origin)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(index, request)))
        # A policy that falls behind would keep the benchmark waiting on its backlog: cut it off.
        await asyncio.wait(tasks, timeout=drain_s)
        results = []
        for index, (task, request) in enumerate(zip(tasks, trace)):
            if task.done():
                results.append(task.result())
            elif index in first_tokens:  # its TTFT is known; only its tail was cut
                task.cancel()
                results.append(Result(first_tokens[index], True, request.kind))
            else:
                task.cancel()
                results.append(Result(None, False, request.kind, "cut off"))
        return results


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


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^rtpllm:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def checkpoint(cpu_smoke: bool, root: Path) -> Path:
    path = root / (SHAPE + ("-tiny" if cpu_smoke else ""))
    if not (path / "config.json").exists():
        command = [sys.executable, "-m", "rtpllm.tools.random_checkpoint", "--shape", SHAPE, "--out", str(path)]
        subprocess.run(command + (["--tiny", "--device", "cpu"] if cpu_smoke else []), check=True)
    return path


def start_instances(args, model: Path, logs: Path) -> list[tuple[str, subprocess.Popen]]:
    instances = []
    for i in range(args.instances):
        port = free_port()
        command = [sys.executable, "-m", "rtpllm.serving.cli", "--log-level", "WARNING", "serve", "--model", str(model),
                   "--port", str(port), "--max-model-len", str(args.max_model_len), "--disable-uvicorn-access-log",
                   "--uvicorn-log-level", "warning"]
        if args.cpu_smoke:
            command += ["--num-blocks", str(args.num_blocks or 160)]
        else:
            command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            if args.num_blocks:
                command += ["--num-blocks", str(args.num_blocks)]
        log = open(logs / f"instance{i}.log", "w")
        # Started together: each sizes its KV cache from its own share of the card, not from what is free.
        instances.append((f"http://127.0.0.1:{port}", subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
    for i, (url, process) in enumerate(instances):
        wait_healthy(url, process, 300, f"instance {i}")
    return instances


def run_policy(args, policy: str, backends: list[str], trace: list[TraceRequest], logs: Path) -> RunReport:
    port = free_port()
    command = [sys.executable, "-m", "rtpllm.serving.cli", "--log-level", "WARNING", "router", "--port", str(port),
               "--policy", policy, "--long-prompt-threshold", str(args.long_prompt_threshold),
               "--uvicorn-log-level", "warning"]
    for url in backends:
        command += ["--backend", url]
    url = f"http://127.0.0.1:{port}"
    with open(logs / f"router-{policy}.log", "w") as log:
        router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, router, 120, "the router")
            time.sleep(1.0)  # its KV event subscriptions and first load polls
            before = [(metric_sum(b, "prefix_cache_queries_total"), metric_sum(b, "prefix_cache_hits_total"))
                      for b in backends]
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
                model = json.loads(response.read())["data"][0]["id"]
            start = time.perf_counter()
            results = asyncio.run(replay(url, model, trace, args.trace.max_tokens, args.drain_timeout))
            report = RunReport(policy, results, wall_s=time.perf_counter() - start)
            for b, (queries, hits) in zip(backends, before):
                report.prefix_queries += metric_sum(b, "prefix_cache_queries_total") - queries
                report.prefix_hits += metric_sum(b, "prefix_cache_hits_total") - hits
        finally:
            router.terminate()
            router.wait(30)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (bench/gpu/run_all.sh format)")
    parser.add_argument("--quick", action="store_true", help="a shorter trace (40 s per policy)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, short trace")
    parser.add_argument("--instances", type=int, default=None, help="default: 4 (GPU), 3 (CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                        help="each instance's share of the GPU's memory")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (overrides the share)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="requests per second")
    parser.add_argument("--duration", type=float, default=None, help="seconds of trace per policy")
    parser.add_argument("--long-prompt-threshold", type=int, default=None)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=45.0,
                        help="seconds a policy's unfinished requests get after the trace ends (then: cut off)")
    args = parser.parse_args()
    trace_shape = CPU_TRACE if args.cpu_smoke else GPU_TRACE
    if args.quick:
        trace_shape = TraceShape(**{**trace_shape.__dict__, "duration_s": min(trace_shape.duration_s, 40)})
    if args.rate is not None:
        trace_shape = TraceShape(**{**trace_shape.__dict__, "rate": args.rate})
    if args.duration is not None:
        trace_shape = TraceShape(**{**trace_shape.__dict__, "duration_s": args.duration})
    args.trace = trace_shape
    args.instances = args.instances or (3 if args.cpu_smoke else 4)
    args.max_model_len = args.max_model_len or (1024 if args.cpu_smoke else 16384)
    args.long_prompt_threshold = args.long_prompt_threshold or (256 if args.cpu_smoke else 4096)
    if args.cpu_smoke:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

    root = Path(os.environ.get("RTPLLM_BENCH_DIR", tempfile.gettempdir()))
    logs = Path(tempfile.mkdtemp(prefix="bench-router-"))
    model = checkpoint(args.cpu_smoke, root)
    started = time.perf_counter()
    instances = start_instances(args, model, logs)
    blocks = [metric_sum(url, "kv_cache_blocks_total") for url, _ in instances]
    print(f"{len(instances)} instances up in {time.perf_counter() - started:.0f} s, KV blocks each: "
          f"{', '.join(f'{b:.0f}' for b in blocks)} (logs: {logs})", flush=True)
    reports: dict[str, RunReport] = {}
    try:
        backends = [url for url, _ in instances]
        for salt, policy in enumerate(args.policies.split(",")):
            trace = build_trace(args.trace, args.seed, salt)
            report = run_policy(args, policy, backends, trace, logs)
            reports[policy] = report
            failed = [r for r in report.results if not r.ok and r.error != "cut off"]
            cut = sum(r.error == "cut off" for r in report.results)
            print(f"{policy:>13}: {len(report.results)} requests ({len(failed)} failed, {cut} cut off before their "
                  f"first token) in {report.wall_s:.0f} s, "
                  f"TTFT p50 {1e3 * report.ttft(0.5):.0f} ms p95 {1e3 * report.ttft(0.95):.0f} ms "
                  f"(short p95 {1e3 * report.ttft(0.95, 'turn'):.0f} ms), hit rate {report.hit_rate:.3f}", flush=True)
            for r in failed[:3]:
                print(f"   failed: {r.error}")
    finally:
        for _, process in instances:
            process.terminate()
        for _, process in instances:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    rows = []
    for policy, report in reports.items():
        rows += [{"name": f"{policy} TTFT p50", "value": 1e3 * report.ttft(0.5), "unit": "ms", "ceiling": "",
                  "ratio": None},
                 {"name": f"{policy} TTFT p95", "value": 1e3 * report.ttft(0.95), "unit": "ms", "ceiling": "",
                  "ratio": None},
                 {"name": f"{policy} short-prompt TTFT p95", "value": 1e3 * report.ttft(0.95, "turn"), "unit": "ms",
                  "ceiling": "", "ratio": None},
                 {"name": f"{policy} prefix hit rate", "value": report.hit_rate, "unit": "", "ceiling": "",
                  "ratio": None}]
    summary = {}
    if "cache_aware" in reports and "round_robin" in reports:
        ca, rr = reports["cache_aware"], reports["round_robin"]
        summary = {"ttft_p95_vs_round_robin": ca.ttft(0.95) / rr.ttft(0.95),
                   "hit_rate_vs_round_robin": ca.hit_rate / rr.hit_rate if rr.hit_rate else float("inf")}
        rows += [{"name": "cache_aware TTFT p95 / round_robin", "value": summary["ttft_p95_vs_round_robin"],
                  "unit": "x", "ceiling": "goal <= 0.65", "ratio": None},
                 {"name": "cache_aware hit rate / round_robin", "value": summary["hit_rate_vs_round_robin"],
                  "unit": "x", "ceiling": "goal >= 2", "ratio": None}]
        print(f"cache_aware vs round_robin: TTFT p95 {summary['ttft_p95_vs_round_robin']:.2f}x (goal <= 0.65), "
              f"hit rate {summary['hit_rate_vs_round_robin']:.2f}x (goal >= 2)")
    if args.json:
        device = "cpu" if args.cpu_smoke else _gpu_name()
        with open(args.json, "w") as f:
            json.dump({"bench": "router", "device": device, "rows": rows, "summary": summary,
                       "trace": args.trace.__dict__, "instances": args.instances,
                       "gpu_memory_utilization": args.gpu_memory_utilization, "kv_blocks_per_instance": blocks},
                      f, indent=1)
    ok = all(r.ok or r.error == "cut off" for report in reports.values() for r in report.results)
    return 0 if ok else 1


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
