"""`rtpllm bench serve`: an HTTP load generator for any OpenAI-compatible server.

Requests start on a Poisson (or gamma, with --burstiness) arrival process at --request-rate, at
most --max-concurrency at a time; each streams its reply and is timed like `vllm bench serve`
(see request_client.py and serve_metrics.py for the definitions). Warm-up requests run first and
are not counted. Multi-turn conversations hold one concurrency slot for all their turns and send
each turn with the whole history, including the answers the server gave.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from rtpllm.benchmarks.datasets import SampleRequest, add_dataset_args, load_requests
from rtpllm.benchmarks.plot import plot_serve_run
from rtpllm.benchmarks.report import format_serve_table, write_json
from rtpllm.benchmarks.request_client import (CHAT_COMPLETIONS, COMPLETIONS, RequestInput, RequestResult,
                                              send_request)
from rtpllm.benchmarks.serve_metrics import calculate_metrics, output_token_counts, parse_goodput
from rtpllm.benchmarks.tokenizer import load_tokenizer
from rtpllm.engine.gc_heap import freeze_startup_heap

logger = logging.getLogger(__name__)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target server")
    target.add_argument("--base-url", default=None,
                        help="e.g. http://127.0.0.1:8000 (default: from --host/--port); a server or router with "
                             "--api-key gets $OPENAI_API_KEY")
    target.add_argument("--host", default="127.0.0.1")
    target.add_argument("--port", type=int, default=8000)
    target.add_argument("--endpoint", default=COMPLETIONS, choices=(COMPLETIONS, CHAT_COMPLETIONS))
    target.add_argument("--model", default=None,
                        help="Model path; also the tokenizer's when --tokenizer is not given.")
    target.add_argument("--served-model-name", default=None,
                        help="The model name sent in requests (default: the first of the server's /v1/models).")
    target.add_argument("--tokenizer", default=None,
                        help="Tokenizer folder or .gguf (default: --model, else the built-in default model's).")
    add_dataset_args(parser)
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Requests per second (default inf: all at once, bounded by --max-concurrency).")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="Gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier, > 1 steadier.")
    load.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    load.add_argument("--num-warmups", type=int, default=1, help="Requests sent (and not counted) before the run.")
    load.add_argument("--ignore-eos", action="store_true", help="Generate exactly the dataset's output lengths.")
    load.add_argument("--temperature", type=float, default=None)
    load.add_argument("--top-p", type=float, default=None)
    load.add_argument("--top-k", type=int, default=None)
    load.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="Seconds before a request fails.")
    out = parser.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                     help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (metrics: ttft, tpot, e2el).")
    out.add_argument("--metric-percentiles", default="90,99", help="Comma-separated percentiles to report.")
    out.add_argument("--output-json", default=None, help="Write the results to this JSON file.")
    out.add_argument("--save-detailed", action="store_true", help="Put per-request timings in the JSON too.")
    out.add_argument("--plot", default=None, metavar="FILE.png", help="Draw TTFT/ITL histograms and throughput.")
    out.add_argument("--disable-tqdm", action="store_true")


@dataclass
class LoadSpec:
    api_url: str
    model: str
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    num_warmups: int = 1
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 6 * 3600.0
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request-rate: must be > 0, got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness: must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max-concurrency: must be >= 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise ValueError(f"num-warmups: must be >= 0, got {self.num_warmups}")

    @property
    def is_chat(self) -> bool:
        return self.api_url.endswith(CHAT_COMPLETIONS)


@dataclass
class LoadRun:
    results: list[RequestResult]  # one per sent request (a conversation sends one per turn)
    start_time: float  # perf_counter() at the first request
    duration_s: float


def _arrival_delays(count: int, spec: LoadSpec) -> np.ndarray:
    """Seconds to wait before each request: gamma(shape=burstiness) gaps with mean 1/request_rate."""
    if math.isinf(spec.request_rate):
        return np.zeros(count)
    rng = np.random.default_rng(spec.seed)
    return rng.gamma(shape=spec.burstiness, scale=1.0 / (spec.request_rate * spec.burstiness), size=count)


async def _run_conversation(session: aiohttp.ClientSession, spec: LoadSpec, request: SampleRequest,
                            progress) -> list[RequestResult]:
    """Sends every turn of the request; a failed turn ends the conversation."""
    prompt: Any = request.prompt
    results = []
    turns = [(request.prompt, request.prompt_len, request.expected_output_len)]
    turns += [(t.user_message, 0, t.expected_output_len) for t in request.next_turns]
    history: list[dict[str, str]] = []
    for i, (message, prompt_len, output_len) in enumerate(turns):
        if spec.is_chat:
            history.append({"role": "user", "content": message})
            prompt = list(history)
        result = await send_request(session, RequestInput(
            api_url=spec.api_url, model=spec.model, prompt=prompt, prompt_len=prompt_len, output_len=output_len,
            ignore_eos=spec.ignore_eos, extra_body=spec.extra_body))
        if i > 0 and result.usage_prompt_tokens is not None:
            result.prompt_len = result.usage_prompt_tokens  # the whole history, as the server counted it
        results.append(result)
        if progress is not None:
            progress.update(1)
        if not result.success:
            break
        history.append({"role": "assistant", "content": result.generated_text})
    return results


def auth_headers() -> dict[str, str]:
    """A server or router started with --api-key needs it: taken from $OPENAI_API_KEY, as the
    OpenAI client and `vllm bench serve` do."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_load(requests: list[SampleRequest], spec: LoadSpec) -> LoadRun:
    """Warms up, then sends `requests` on the arrival schedule and collects every result."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)  # concurrency is bounded below, not here
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=auth_headers()) as session:
        if spec.num_warmups:
            warmups = [requests[i % len(requests)] for i in range(spec.num_warmups)]
            warm = await asyncio.gather(*(_run_conversation(session, spec, r, None) for r in warmups))
            failed = [r for rs in warm for r in rs if not r.success]
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0].error}")

        progress = None
        if spec.show_progress:
            from tqdm import tqdm

            progress = tqdm(total=sum(r.num_turns for r in requests), desc="requests", dynamic_ncols=True)
        semaphore = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None

        async def limited(request: SampleRequest) -> list[RequestResult]:
            if semaphore is None:
                return await _run_conversation(session, spec, request, progress)
            async with semaphore:
                return await _run_conversation(session, spec, request, progress)

        start = time.perf_counter()
        tasks = []
        for request, delay in zip(requests, _arrival_delays(len(requests), spec)):
            tasks.append(asyncio.create_task(limited(request)))
            if delay > 0:
                await asyncio.sleep(delay)
        per_request = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    return LoadRun([r for results in per_request for r in results], start, duration)


async def _served_model_name(base_url: str) -> str:
    async with aiohttp.ClientSession(headers=auth_headers()) as session:
        async with session.get(base_url + "/v1/models") as response:
            if response.status != 200:
                raise ValueError(f"served-model-name: {base_url}/v1/models answered HTTP {response.status}")
            models = (await response.json()).get("data") or []
    if not models:
        raise ValueError(f"served-model-name: {base_url}/v1/models lists no model")
    return models[0]["id"]


def _base_url(args: argparse.Namespace) -> str:
    base = args.base_url or f"http://{args.host}:{args.port}"
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base-url: expected http(s)://host:port, got {base!r}")
    return base.rstrip("/")


def run_event_loop(coroutine):
    """Runs the load on uvloop where installed: with hundreds of streams, asyncio's own loop made
    this client take a third of a small machine's CPU, which the server under test then lacks."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def main(args: argparse.Namespace) -> int:
    base_url = _base_url(args)
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    slos = parse_goodput(args.goodput)
    model_path = args.model if args.model and os.path.exists(args.model) else None
    tokenizer = load_tokenizer(args.tokenizer or model_path)
    requests = load_requests(args, tokenizer)
    if args.endpoint != CHAT_COMPLETIONS and any(r.next_turns for r in requests):
        raise ValueError(f"endpoint: multi-turn conversations need --endpoint {CHAT_COMPLETIONS}")
    model = args.served_model_name or (args.model if args.model and not model_path else None)
    model = model or asyncio.run(_served_model_name(base_url))
    extra = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
             if v is not None}
    spec = LoadSpec(api_url=base_url + args.endpoint, model=model, request_rate=args.request_rate,
                    burstiness=args.burstiness, max_concurrency=args.max_concurrency, num_warmups=args.num_warmups,
                    ignore_eos=args.ignore_eos, extra_body=extra, request_timeout_s=args.request_timeout,
                    seed=args.seed, show_progress=not args.disable_tqdm)
    freeze_startup_heap()  # the tokenizer and the requests stay; keep the collector off them during the load
    run = run_event_loop(run_load(requests, spec))

    output_lens = output_token_counts(run.results, tokenizer)
    metrics = calculate_metrics(run.results, output_lens, run.duration_s, percentiles, slos)
    header = {"Endpoint": spec.api_url, "Dataset": args.dataset_name, "Request rate": args.request_rate,
              "Max concurrency": args.max_concurrency or "unlimited"}
    print(format_serve_table(metrics, header))
    for error in sorted({r.error for r in run.results if r.error})[:5]:
        print(f"error: {error}")
    result = {"date": datetime.now().isoformat(timespec="seconds"), "endpoint": spec.api_url, "model": model,
              "dataset_name": args.dataset_name, "num_prompts": len(requests),
              "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "goodput_slos_s": slos,
              **metrics.to_dict()}
    if args.save_detailed:
        result.update(input_lens=[r.prompt_len for r in run.results], output_lens=output_lens,
                      ttfts=[r.ttft for r in run.results], itls=[r.itl for r in run.results],
                      e2els=[r.latency for r in run.results], errors=[r.error for r in run.results])
    write_json(args.output_json, result)
    if args.plot:
        plot_serve_run(args.plot, run.results, output_lens, run.start_time,
                       f"{model} · {args.dataset_name} · rate {args.request_rate} · "
                       f"concurrency {args.max_concurrency or 'unlimited'}")
    return 0 if metrics.failed == 0 else 1
