"""KV tiers end to end on the Llama-3.1-8B-shaped random checkpoint (issue 16).

1. A multi-turn chat trace at a fixed conversation arrival rate, whose working set is about 4x
   the GPU KV pool (capped with num_blocks): every conversation has its own system prompt, each
   turn re-sends the whole history (prompt + earlier answers + the new user message) a think time
   after the previous answer, so a turn hits the prefix cache only if its conversation's blocks
   survived the other conversations' traffic since its last turn. Prefix
   hit rate (GPU prefix cache + blocks loaded from the tiers, over prompt tokens) and TTFT p50/p95
   with tiers off, host memory, and a small host tier over disk.
2. No reuse (random 1024/128, offline): throughput with the host tier on vs off, for each CUDA
   copy method of the saves (`kv_copy_method`: kernel, hybrid = saves staged).
3. The disk: the raw O_DIRECT read rate of the disk tier's file system (one thread, 8 MiB reads;
   and as many threads as the tier has readers, one block file per read), measured in this run,
   against the rate the tier's readers measured during the trace (all readers together) and the
   rate one load saw on average (bytes over load latency, queueing included).

The trace is driven in-process through `Engine` (arrival times, TTFT from the engine's request
metrics), so one model load serves each configuration and the whole run fits in ~4 minutes on an
H100. `--cpu-smoke` runs the same code on the CPU with the tiny variant of the checkpoint, with
sizes scaled down, to check the script without a GPU.

    python bench/gpu/bench_kv_tiers.py [--json out.json] [--quick] [--cpu-smoke] [--copy-methods kernel,hybrid]

Environment: RTPLLM_BENCH_DIR (checkpoint cache, default /root/scratch), KV_TIERS_DISK_DIR (the disk
tier's directory, default a fresh folder under RTPLLM_BENCH_DIR).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from rtpllm import LLM, SamplingParams
from rtpllm.benchmarks.datasets import sample_random


@dataclass(frozen=True)
class Sizes:
    """The trace's shape: working set = conversations x final context, against pool tokens."""

    num_conversations: int
    turns: int
    system_tokens: int
    user_tokens: int
    answer_tokens: int
    conversations_per_s: float
    think_s: float  # between an answer and the conversation's next turn: other conversations churn the pool
    num_blocks: int  # the GPU pool, capped
    host_gib: float  # the "host" configuration's host tier (holds the whole working set)
    small_host_gib: float  # the "host+disk" configuration's host tier (a fraction of it)
    disk_gib: float
    random_requests: int
    max_num_seqs: int

    @property
    def final_context(self) -> int:
        return self.system_tokens + self.turns * self.user_tokens + (self.turns - 1) * self.answer_tokens


GPU = Sizes(num_conversations=40, turns=4, system_tokens=512, user_tokens=128, answer_tokens=64,
            conversations_per_s=4.0, think_s=2.5, num_blocks=700, host_gib=12.0, small_host_gib=2.0, disk_gib=24.0,
            random_requests=400, max_num_seqs=256)
GPU_QUICK = Sizes(num_conversations=24, turns=3, system_tokens=512, user_tokens=128, answer_tokens=64,
                  conversations_per_s=4.0, think_s=2.0, num_blocks=400, host_gib=12.0, small_host_gib=1.0,
                  disk_gib=24.0,
                  random_requests=200, max_num_seqs=256)
CPU_SMOKE = Sizes(num_conversations=8, turns=3, system_tokens=96, user_tokens=16, answer_tokens=8,
                  conversations_per_s=4.0, think_s=0.5, num_blocks=24, host_gib=0.05, small_host_gib=0.0002,
                  disk_gib=0.05, random_requests=8, max_num_seqs=16)


@dataclass
class Conversation:
    system: list[int]
    users: list[list[int]]
    history: list[int] = field(default_factory=list)
    turn: int = 0


def checkpoint_dir(tiny: bool) -> Path:
    name = "llama-3.1-8b" + ("-tiny" if tiny else "")
    path = Path(os.environ.get("RTPLLM_BENCH_DIR", "/root/scratch")) / name
    if not (path / "config.json").exists():
        command = [sys.executable, "-m", "rtpllm.tools.random_checkpoint", "--shape", "llama-3.1-8b",
                   "--out", str(path)]
        subprocess.run(command + (["--tiny", "--device", "cpu"] if tiny else []), check=True)
    return path


def make_trace(sizes: Sizes, vocab: int, seed: int = 0) -> list[Conversation]:
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(10, vocab - 10) for _ in range(n)]  # noqa: E731
    return [Conversation(draw(sizes.system_tokens), [draw(sizes.user_tokens) for _ in range(sizes.turns)])
            for _ in range(sizes.num_conversations)]


def run_trace(llm: LLM, sizes: Sizes, vocab: int) -> dict:
    """Conversations arrive at a fixed rate (Poisson, seeded); a conversation's next turn is sent
    think_s after its previous answer completed. Returns hit rates and TTFT percentiles."""
    engine = llm.engine
    conversations = make_trace(sizes, vocab)
    gaps = np.random.default_rng(0).exponential(1.0 / sizes.conversations_per_s, size=len(conversations))
    arrivals = [(float(t), i) for i, t in enumerate(np.cumsum(gaps) - gaps[0])]
    heapq.heapify(arrivals)
    params = SamplingParams(temperature=0.0, max_tokens=sizes.answer_tokens, ignore_eos=True)
    before = engine.stats()
    ttfts: list[float] = []
    live: dict[str, Conversation] = {}
    start = time.monotonic()
    total = sizes.num_conversations * sizes.turns
    while len(ttfts) < total:
        now = time.monotonic() - start
        while arrivals and arrivals[0][0] <= now:
            _, i = heapq.heappop(arrivals)
            _send_turn(engine, conversations[i], i, live, params)
        if not engine.has_unfinished_requests():
            if arrivals:
                time.sleep(max(0.0, arrivals[0][0] - (time.monotonic() - start)))
            continue
        for output in engine.step():
            if not output.finished:
                continue
            conv = live.pop(output.request_id)
            metrics = output.metrics
            ttfts.append(metrics.first_token_time - metrics.arrival_time)
            conv.history += list(output.outputs[0].token_ids)
            conv.turn += 1
            if conv.turn < sizes.turns:  # the user reads, thinks, and sends the next turn
                index = int(output.request_id.split("-")[1])
                heapq.heappush(arrivals, (time.monotonic() - start + sizes.think_s, index))
    elapsed = time.monotonic() - start
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    gpu_hits = after.prefix_cache_hits - before.prefix_cache_hits
    tier_hits = after.kv_tier_hit_tokens - before.kv_tier_hit_tokens
    ttfts.sort()
    return {"elapsed_s": elapsed, "turns": len(ttfts), "prompt_tokens_looked_up": queries,
            "gpu_hit_rate": gpu_hits / queries, "tier_hit_rate": tier_hits / queries,
            "hit_rate": (gpu_hits + tier_hits) / queries,
            "ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_p95_ms": 1000 * ttfts[int(0.95 * (len(ttfts) - 1))],
            "recomputes": after.kv_tier_failed_loads - before.kv_tier_failed_loads,
            "preemptions": after.num_preemptions - before.num_preemptions,
            "tiers": {t.name: {"loaded_blocks": t.loaded_blocks, "saved_blocks": t.saved_blocks,
                               "skipped_blocks": t.skipped_blocks, "load_GBps": _gbps(t),
                               "used_blocks": t.used_blocks, "capacity_blocks": t.capacity_blocks,
                               "enabled": t.enabled}
                      for t in after.kv_tiers},
            "disk_readers_GBps": _disk_readers_gbps(engine)}


def _send_turn(engine, conv: Conversation, index: int, live: dict, params: SamplingParams) -> None:
    if conv.turn == 0:
        conv.history = list(conv.system)
    conv.history += conv.users[conv.turn]
    request_id = f"conv-{index}-{conv.turn}"
    engine.add_request(request_id, list(conv.history), params, arrival_time=time.monotonic(), stream=False)
    live[request_id] = conv


def _gbps(tier) -> Optional[float]:
    if not tier.load_latency_count or not tier.load_latency_sum:
        return None
    return tier.load_bytes / tier.load_latency_sum / 1e9  # per second of load latency (a lower bound)


def _disk_readers_gbps(engine) -> Optional[float]:
    """The disk tier's read rate, all readers together, as its readers measured it (read + verify
    per block, under the load they saw); None without a disk tier or before its first read."""
    tiers = engine.kv_tiers
    if tiers is None or "disk" not in tiers.tiers:
        return None
    blocks = 64
    seconds = tiers.tiers["disk"].expected_load_seconds(blocks)  # the queue is empty after the trace
    return blocks * tiers.bytes_per_block / seconds / 1e9 if seconds > 0 else None


def raw_direct_read_gbps(directory: Path, file_bytes: int, threads: int, total_bytes: int = 1 << 30) -> Optional[dict]:
    """O_DIRECT read rate of `directory`'s file system: one file of total_bytes written with
    O_DIRECT, then read back with one thread in 8 MiB reads, and with `threads` threads one
    file_bytes piece per read (what the disk tier's readers do). GB/s; None where the file system
    refuses O_DIRECT (tmpfs)."""
    try:
        return _raw_direct_read_gbps(directory, file_bytes, threads, total_bytes)
    except OSError as e:
        print(f"raw O_DIRECT measurement skipped: {e}", flush=True)
        return None


def _raw_direct_read_gbps(directory: Path, file_bytes: int, threads: int, total_bytes: int) -> dict:
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    chunk = 8 << 20
    total_bytes = total_bytes // chunk * chunk
    path = directory / "raw_direct_read.bin"
    directory.mkdir(parents=True, exist_ok=True)
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    buffer.write(os.urandom(chunk))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        for offset in range(0, total_bytes, chunk):
            os.pwritev(fd, [buffer], offset)
        os.fsync(fd)
        write_s = time.perf_counter() - start
    finally:
        os.close(fd)

    def read(request: int, offsets: list[int]) -> None:
        piece = mmap.mmap(-1, request)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for offset in offsets:
                os.preadv(fd, [piece], offset)
        finally:
            os.close(fd)

    start = time.perf_counter()
    read(chunk, list(range(0, total_bytes, chunk)))
    one_s = time.perf_counter() - start
    request = (file_bytes + 4095) // 4096 * 4096
    offsets = list(range(0, total_bytes - request + 1, request))
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: read(request, offsets[t::threads]), range(threads)))
    many_s = time.perf_counter() - start
    path.unlink()
    return {"write_GBps": total_bytes / write_s / 1e9, "read_1_thread_GBps": total_bytes / one_s / 1e9,
            f"read_{threads}_threads_GBps": len(offsets) * request / many_s / 1e9, "threads": threads}


def offline_throughput(llm: LLM, sizes: Sizes, input_len: int, output_len: int) -> dict:
    tokenizer = llm.get_tokenizer()
    prompts = [r.prompt for r in sample_random(tokenizer, sizes.random_requests, input_len, output_len, 0.0, 0, 0)]
    warmup = [r.prompt for r in sample_random(tokenizer, 8, input_len, output_len, 0.0, 0, 1)]  # other prompts
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0)
    llm.generate(warmup, params)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return {"rps": len(outputs) / elapsed, "elapsed_s": elapsed,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (bench/gpu/bench_util.py format)")
    parser.add_argument("--quick", action="store_true", help="a shorter trace")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny checkpoint on the CPU: checks the script")
    parser.add_argument("--copy-methods", default="hybrid,kernel",
                        help="kv_copy_method values to measure no-reuse throughput with (the trace uses the first)")
    args = parser.parse_args()
    methods = [m for m in args.copy_methods.split(",") if m]
    sizes = CPU_SMOKE if args.cpu_smoke else (GPU_QUICK if args.quick else GPU)
    device = "cpu" if args.cpu_smoke else "cuda"
    card = "CPU" if args.cpu_smoke else _card()
    path = checkpoint_dir(tiny=args.cpu_smoke)
    disk_root = Path(os.environ.get("KV_TIERS_DISK_DIR") or tempfile.mkdtemp(
        prefix="kv-tiers-", dir=os.environ.get("RTPLLM_BENCH_DIR") if not args.cpu_smoke else None))
    block_size = 16
    pool_tokens = sizes.num_blocks * block_size
    working_set = sizes.num_conversations * sizes.final_context
    print(f"[{card}] trace: {sizes.num_conversations} conversations x {sizes.turns} turns at "
          f"{sizes.conversations_per_s}/s, working set {working_set} tokens = {working_set / pool_tokens:.1f}x "
          f"the pool ({sizes.num_blocks} blocks of {block_size})", flush=True)

    common = dict(model=str(path), device=device, num_blocks=sizes.num_blocks, block_size=block_size,
                  max_num_seqs=sizes.max_num_seqs, max_model_len=4096 if not args.cpu_smoke else 1024)
    if not args.cpu_smoke:
        common["kv_copy_method"] = methods[0]
    configs = {
        "off": dict(kv_host_cache_gib=0),
        "host": dict(kv_host_cache_gib=sizes.host_gib),
        "host+disk": dict(kv_host_cache_gib=sizes.small_host_gib, kv_disk_cache_dir=str(disk_root / "disk"),
                          kv_disk_cache_gib=sizes.disk_gib),
    }
    rows: list[dict] = []
    results: dict[str, dict] = {}
    throughput: dict[str, dict] = {}
    for name, options in configs.items():
        start = time.perf_counter()
        llm = LLM(**common, **options)
        vocab = llm.engine.vocab_size
        load_s = time.perf_counter() - start
        results[name] = run_trace(llm, sizes, vocab)
        r = results[name]
        print(f"[{card}] trace, tiers {name}: hit rate {r['hit_rate']:.3f} (GPU {r['gpu_hit_rate']:.3f}, tiers "
              f"{r['tier_hit_rate']:.3f}), TTFT p50 {r['ttft_p50_ms']:.1f} ms p95 {r['ttft_p95_ms']:.1f} ms, "
              f"{r['recomputes']} recomputes, {r['preemptions']} preemptions, {r['elapsed_s']:.1f} s "
              f"(engine built in {load_s:.1f} s) {r['tiers']}", flush=True)
        if name == "host+disk":
            disk = results[name]
            raw = raw_direct_read_gbps(disk_root / "raw", llm.engine.kv_tiers.tiers["disk"].file_bytes_per_block,
                                       threads=8, total_bytes=(1 << 30) if not args.cpu_smoke else (64 << 20))
            disk["raw_direct"] = raw
            if raw is not None:
                print(f"[{card}] disk: raw O_DIRECT read {raw['read_1_thread_GBps']:.2f} GB/s (1 thread, 8 MiB), "
                      f"{raw['read_8_threads_GBps']:.2f} GB/s (8 threads, block files), write "
                      f"{raw['write_GBps']:.2f} GB/s", flush=True)
            print(f"[{card}] disk tier: readers {_fmt(disk['disk_readers_GBps'])} GB/s together, one load "
                  f"{_fmt(disk['tiers']['disk']['load_GBps'])} GB/s on average", flush=True)
        llm.engine.close()
        del llm
        gc.collect()
        _empty_cache(device)
        for tp_name in (["off"] if name == "off" else [f"host/{m}" for m in methods] if name == "host" else []):
            # No reuse: the pool at its usual size (profiled), only the tiers (and their copy method) differ.
            tp_options = dict(common, num_blocks=None, max_num_seqs=384 if not args.cpu_smoke else 16)
            if tp_name == "off":
                tp_options["kv_host_cache_gib"] = 0
            elif not args.cpu_smoke:
                tp_options["kv_copy_method"] = tp_name.split("/")[1]
            try:
                llm = LLM(**tp_options)
                throughput[tp_name] = offline_throughput(llm, sizes, 1024 if not args.cpu_smoke else 128,
                                                         128 if not args.cpu_smoke else 8)
            except Exception as e:  # one copy method failing must not cost the other rows
                print(f"[{card}] random 1024/128, tiers {tp_name}: FAILED: {e!r}", flush=True)
                continue
            print(f"[{card}] random 1024/128 x{sizes.random_requests}, tiers {tp_name}: "
                  f"{throughput[tp_name]['rps']:.2f} req/s", flush=True)
            llm.engine.close()
            del llm
            gc.collect()
            _empty_cache(device)

    off = results["off"]
    for name, r in results.items():
        rows.append(dict(name=f"multi-turn hit rate, tiers {name}", value=r["hit_rate"], unit="",
                         ceiling="tiers off", ratio=r["hit_rate"] / off["hit_rate"] if off["hit_rate"] else None,
                         goal="host >= 3x off", **{k: v for k, v in r.items() if k != "tiers"}))
        rows.append(dict(name=f"multi-turn TTFT p95, tiers {name}", value=r["ttft_p95_ms"], unit="ms",
                         ceiling="tiers off", ratio=r["ttft_p95_ms"] / off["ttft_p95_ms"], goal="<= 0.65x off",
                         ttft_p50_ms=r["ttft_p50_ms"], tiers=r["tiers"]))
    for tp_name, tp in throughput.items():
        if tp_name == "off":
            continue
        rows.append(dict(name=f"random 1024/128 throughput, host tier on ({tp_name.split('/')[1]} copies)",
                         value=tp["rps"], unit="req/s", ceiling="tiers off", ratio=tp["rps"] / throughput["off"]["rps"],
                         goal=">= 0.98x", off_rps=throughput["off"]["rps"], requests=sizes.random_requests))
    disk = results["host+disk"]
    raw = disk["raw_direct"]
    for label, rate in (("tier readers (all together, as measured by them)", disk["disk_readers_GBps"]),
                        ("one load on average (bytes / load latency, queueing included)",
                         disk["tiers"]["disk"]["load_GBps"])):
        if rate is not None:
            rows.append(dict(name=f"disk read rate, {label}", value=rate, unit="GB/s",
                             ceiling="raw O_DIRECT read, 8 threads",
                             ratio=rate / raw["read_8_threads_GBps"] if raw else None, goal="near the raw rate",
                             raw=raw))
    for row in rows:
        ratio = "" if row["ratio"] is None else f" ratio {row['ratio']:.3f}"
        print(f"[{card}] {row['name']}: {row['value']:.3f} {row['unit']}{ratio} (goal {row['goal']})", flush=True)
    if args.json:
        _write_json(args.json, card, rows)
    if not os.environ.get("KV_TIERS_DISK_DIR"):
        shutil.rmtree(disk_root, ignore_errors=True)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _card() -> str:
    import torch

    return torch.cuda.get_device_name()


def _empty_cache(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _write_json(path: str, card: str, rows: list[dict]) -> None:
    import json

    with open(path, "w") as f:
        json.dump({"bench": "kv_tiers", "device": card, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
