"""`rtpllm router` on one GPU: several instances of a Llama-3.2-1B-shaped random checkpoint, each
with its share of the GPU's memory, behind the router; a multi-tenant trace (rtpllm/tools/
router_trace.py: system prompts shared by tenant groups, multi-turn conversations, a share of long
one-off prompts) replayed at one request rate under each policy (cache_aware, round_robin,
least_loaded). Reports client-side TTFT p50/p95, the instances' prefix-cache hit rate, how many
requests each instance got and the instances' own mean queue time and TTFT, per policy; and
cache_aware's TTFT p95 and hit rate against round_robin's (goals: <= 0.65x, >= 2x).

The rate. At a rate the card serves with room to spare (the first H100 run: 10 req/s, p50 about
20 ms for every policy), TTFT is the fixed cost of a request (HTTP, the router's hop, an engine
step) plus a short prefill, and routing can only trim the prefill: cache_aware's p95 was 0.91x
round-robin's with twice the hit rate. The issue's comparison ("at equal load") is about the
queue: so the benchmark first measures what round-robin sustains on this trace (a closed-loop probe:
`--probe-concurrency` requests in flight for `--probe-seconds`), then replays the trace for every
policy at `--load` (default 0.8) times that rate, where round-robin has a queue and the prefill a
cache hit saves is time every later request waits less. `--rate` fixes the rate instead.
The instances share one card, so no routing can spread work over more compute: what cache-aware
routing changes is how much work there is (hits) and where it queues.

The hit rate. This trace caps it near 0.64 (all requests on one instance with an unbounded cache:
a turn reuses its previous turn's prompt, never the reply the model wrote); round-robin gets about
0.3 (every instance soon holds every system prompt; a turn finds its history one time in four), so
2x round-robin means cache_aware at the cap. A larger KV share per instance raises round-robin's
rate (earlier turns stay cached everywhere) and narrows the ratio.

The same arrival times and lengths for every policy; token contents salted per run, so no run
reuses another's cache (the previous run's blocks, oldest in the LRU, go first).

    python bench/gpu/bench_router.py --json out.json          # H100: about 4 minutes (--quick: 3)
    python bench/gpu/bench_router.py --cpu-smoke              # a tiny model on the CPU, ~2 minutes
    python -m rtpllm.tools.router_sim                         # the same trace on a model of the pool
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import aiohttp

from bench_util import free_port, wait_healthy  # run as a script: bench/gpu is on sys.path
from rtpllm.tools.router_trace import CPU_TRACE, GPU_TRACE, TraceRequest, build_trace

POLICIES = ("cache_aware", "round_robin", "least_loaded")
SHAPE = "llama-3.2-1b"


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
    per_instance: list[int] = field(default_factory=list)  # requests the router sent to each instance
    instance_queue_s: float = float("nan")  # the instances' mean wait before a request's first step
    instance_ttft_s: float = float("nan")  # the instances' mean TTFT (from arrival there)

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


async def send(session: aiohttp.ClientSession, url: str, model: str, request: TraceRequest, max_tokens: int,
               on_first_token=lambda ttft: None) -> Result:
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
                    ttft = time.perf_counter() - start
                    on_first_token(ttft)
                if line.startswith(b'data: {"error"'):
                    return Result(None, False, request.kind, line.decode()[:200])
        return Result(ttft, ttft is not None, request.kind)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Result(None, False, request.kind, repr(exc))


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=0))


async def replay(url: str, model: str, trace: list[TraceRequest], max_tokens: int, drain_s: float) -> list[Result]:
    """Open loop: every request at its arrival time, whatever the pool's backlog."""
    async with _session() as session:
        first_tokens: dict[int, float] = {}
        origin = time.perf_counter()
        tasks = []
        for index, request in enumerate(trace):
            delay = request.at_s - (time.perf_counter() - origin)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(session, url, model, request, max_tokens,
                                                    lambda ttft, i=index: first_tokens.__setitem__(i, ttft))))
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


async def closed_loop(url: str, model: str, trace: list[TraceRequest], max_tokens: int, concurrency: int,
                      seconds: float) -> float:
    """Requests per second the pool completes with `concurrency` in flight (the trace's requests in
    order, arrival times ignored): completions after the first quarter of the run, which lasts
    `seconds` and at least until 2 * `concurrency` requests completed (a slow pool still gets a
    measurement)."""
    async with _session() as session:
        pending = iter(trace)
        finished: list[float] = []
        origin = time.perf_counter()

        def more() -> bool:
            return time.perf_counter() - origin < seconds or len(finished) < 2 * concurrency

        async def client() -> None:
            for request in pending:
                if not more():
                    return
                result = await send(session, url, model, request, max_tokens)
                if not result.ok:
                    raise RuntimeError(f"the capacity probe's request failed: {result.error}")
                finished.append(time.perf_counter() - origin)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    end = max(seconds, finished[2 * concurrency - 1]) if len(finished) >= 2 * concurrency else finished[-1]
    warm = end / 4
    counted = sum(warm <= t <= end for t in finished)
    if counted == 0:
        raise RuntimeError("the capacity probe saw no request complete (the trace ran out?)")
    return counted / (end - warm)


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


class RouterProcess:
    """`rtpllm router` with `policy` over the instances, for one run."""

    def __init__(self, args, policy: str, backends: list[str], logs: Path):
        port = free_port()
        command = [sys.executable, "-m", "rtpllm.serving.cli", "--log-level", "WARNING", "router", "--port", str(port),
                   "--policy", policy, "--long-prompt-threshold", str(args.long_prompt_threshold),
                   "--uvicorn-log-level", "warning"]
        for url in backends:
            command += ["--backend", url]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(logs / f"router-{policy}.log", "a")
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "RouterProcess":
        try:
            wait_healthy(self.url, self._process, 120, "the router")
            time.sleep(1.0)  # its KV event subscriptions and first load polls
            self.model = get_json(self.url + "/v1/models")["data"][0]["id"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait(30)
        self._log.close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def probe_capacity(args, backends: list[str], logs: Path) -> float:
    """The request rate round-robin sustains on this trace's requests (its own salt: no cache shared
    with the measured runs)."""
    # Enough requests for 320 req/s; the closed loop takes them in arrival order.
    trace = build_trace(args.trace.with_(rate=40.0, duration_s=8 * args.probe_seconds), args.seed, salt=1000)
    with RouterProcess(args, "round_robin", backends, logs) as router:
        return asyncio.run(closed_loop(router.url, router.model, trace, args.trace.max_tokens,
                                       args.probe_concurrency, args.probe_seconds))


def _instance_counters(backends: list[str]) -> list[float]:
    names = ("prefix_cache_queries_total", "prefix_cache_hits_total", "request_queue_time_seconds_sum",
             "request_queue_time_seconds_count", "time_to_first_token_seconds_sum",
             "time_to_first_token_seconds_count")
    return [sum(metric_sum(b, name) for b in backends) for name in names]


def run_policy(args, policy: str, backends: list[str], trace: list[TraceRequest], logs: Path) -> RunReport:
    with RouterProcess(args, policy, backends, logs) as router:
        before = _instance_counters(backends)
        start = time.perf_counter()
        results = asyncio.run(replay(router.url, router.model, trace, args.trace.max_tokens, args.drain_timeout))
        report = RunReport(policy, results, wall_s=time.perf_counter() - start)
        queries, hits, queue_sum, queue_n, ttft_sum, ttft_n = (
            a - b for a, b in zip(_instance_counters(backends), before))
        report.prefix_queries, report.prefix_hits = queries, hits
        report.instance_queue_s = queue_sum / queue_n if queue_n else float("nan")
        report.instance_ttft_s = ttft_sum / ttft_n if ttft_n else float("nan")
        report.per_instance = [b["routed_total"] for b in get_json(router.url + "/router/state")["backends"]]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (bench/gpu/run_all.sh format)")
    parser.add_argument("--quick", action="store_true", help="shorter: 30 s of trace per policy, a 10 s probe")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, short trace")
    parser.add_argument("--instances", type=int, default=None, help="default: 4 (GPU), 3 (CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                        help="each instance's share of the GPU's memory (0.1: about 165k tokens of KV each for "
                             "the 1B shape; a larger cache lets round-robin find more of a conversation's earlier "
                             "turns and narrows the hit-rate gap, tools/router_sim.py shows how much)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (overrides the share)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None,
                        help="requests per second (default: --load times what round-robin sustains)")
    parser.add_argument("--load", type=float, default=0.8, help="the rate as a share of round-robin's capacity")
    parser.add_argument("--probe-seconds", type=float, default=None, help="the capacity probe's length (GPU: 15)")
    parser.add_argument("--probe-concurrency", type=int, default=None, help="requests in flight while probing")
    parser.add_argument("--duration", type=float, default=None, help="seconds of trace per policy (GPU: 40)")
    parser.add_argument("--long-prompt-threshold", type=int, default=None)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds a policy's unfinished requests get after the trace ends (then: cut off)")
    args = parser.parse_args()
    gpu_seconds = 30 if args.quick else 40
    args.trace = (CPU_TRACE if args.cpu_smoke else GPU_TRACE.with_(duration_s=gpu_seconds)).with_(
        duration_s=args.duration)
    args.instances = args.instances or (3 if args.cpu_smoke else 4)
    args.max_model_len = args.max_model_len or (1024 if args.cpu_smoke else 16384)
    args.long_prompt_threshold = args.long_prompt_threshold or (256 if args.cpu_smoke else 4096)
    args.probe_seconds = args.probe_seconds or (12.0 if args.cpu_smoke else 10.0 if args.quick else 15.0)
    args.probe_concurrency = args.probe_concurrency or (4 if args.cpu_smoke else 16) * args.instances
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
    capacity = None
    try:
        backends = [url for url, _ in instances]
        if args.rate is None:
            capacity = probe_capacity(args, backends, logs)
            args.trace = args.trace.with_(rate=args.load * capacity)
            print(f"round_robin sustains {capacity:.1f} req/s ({args.probe_concurrency} in flight); "
                  f"every policy runs at {args.load:.2f}x that: {args.trace.rate:.1f} req/s", flush=True)
        else:
            args.trace = args.trace.with_(rate=args.rate)
        for salt, policy in enumerate(args.policies.split(",")):
            trace = build_trace(args.trace, args.seed, salt)
            report = run_policy(args, policy, backends, trace, logs)
            reports[policy] = report
            failed = [r for r in report.results if not r.ok and r.error != "cut off"]
            cut = sum(r.error == "cut off" for r in report.results)
            print(f"{policy:>13}: {len(report.results)} requests ({len(failed)} failed, {cut} cut off before their "
                  f"first token) in {report.wall_s:.0f} s, "
                  f"TTFT p50 {1e3 * report.ttft(0.5):.0f} ms p95 {1e3 * report.ttft(0.95):.0f} ms "
                  f"(short p95 {1e3 * report.ttft(0.95, 'turn'):.0f} ms), hit rate {report.hit_rate:.3f}; "
                  f"instances: mean queue {1e3 * report.instance_queue_s:.1f} ms, mean TTFT "
                  f"{1e3 * report.instance_ttft_s:.1f} ms, requests {report.per_instance}", flush=True)
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
        for name, value, unit in ((f"{policy} TTFT p50", 1e3 * report.ttft(0.5), "ms"),
                                  (f"{policy} TTFT p95", 1e3 * report.ttft(0.95), "ms"),
                                  (f"{policy} short-prompt TTFT p95", 1e3 * report.ttft(0.95, "turn"), "ms"),
                                  (f"{policy} prefix hit rate", report.hit_rate, ""),
                                  (f"{policy} instances' mean queue time", 1e3 * report.instance_queue_s, "ms")):
            rows.append({"name": name, "value": value, "unit": unit, "ceiling": "", "ratio": None})
    summary = {"rate": args.trace.rate, "round_robin_capacity": capacity, "load": args.load if capacity else None,
               "per_instance": {p: r.per_instance for p, r in reports.items()}}
    if "cache_aware" in reports and "round_robin" in reports:
        ca, rr = reports["cache_aware"], reports["round_robin"]
        summary.update(ttft_p95_vs_round_robin=ca.ttft(0.95) / rr.ttft(0.95),
                       hit_rate_vs_round_robin=ca.hit_rate / rr.hit_rate if rr.hit_rate else float("inf"))
        rows += [{"name": "cache_aware TTFT p95 / round_robin", "value": summary["ttft_p95_vs_round_robin"],
                  "unit": "x", "ceiling": "goal <= 0.65", "ratio": None},
                 {"name": "cache_aware hit rate / round_robin", "value": summary["hit_rate_vs_round_robin"],
                  "unit": "x", "ceiling": "goal >= 2", "ratio": None}]
        print(f"cache_aware vs round_robin at {args.trace.rate:.1f} req/s: TTFT p95 "
              f"{summary['ttft_p95_vs_round_robin']:.2f}x (goal <= 0.65), "
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
