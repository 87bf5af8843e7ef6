"""Weight loading on a Llama-3.1-8B-shaped bf16 checkpoint (16 GB in ~5 GB shards, written once by
`python -m rtpllm.tools.random_checkpoint` into $RTPLLM_BENCH_DIR, default /root/scratch), in one run:

  floors   the disk's O_DIRECT read rate (threads of large aligned reads, page cache dropped) and
           the pinned host-to-device copy rate;
  ours     the C++ loader into the model's parameters on the GPU, cold (pages dropped: O_DIRECT)
           and warm (files in the page cache), plus the whole load_model_and_tokenizer;
  others   transformers' from_pretrained and fastsafetensors (when its wheel is installed), warm;
  serve    `rtpllm serve` from launch to the first answered request, warm.

Ratios: cold / disk floor (goal <= 1.05), warm / H2D floor (goal <= 1.15 and under 1.0 s for
16 GB), serve start (goal < 8 s). --quick leaves out transformers, fastsafetensors and serve.
Cold runs need the page cache to let go of the files (posix_fadvise DONTNEED after fsync); the
run reports the fraction still cached when it could not drop them.
"""

from __future__ import annotations

import gc
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_util import device_name, parse_args, row, write_json  # noqa: E402

from rtpllm.loader import load_model_and_tokenizer  # noqa: E402
from rtpllm.loader.hf_checkpoint import read_json, read_weight_map, safetensors_files  # noqa: E402
from rtpllm.loader.reader import LoaderSettings  # noqa: E402
from rtpllm.loader.safetensors_loader import SafetensorsCheckpoint, load_into_model  # noqa: E402
from rtpllm.models.llama import LlamaForCausalLM  # noqa: E402
from rtpllm.models.llama_arch import LlamaArch  # noqa: E402

SHAPE = "llama-3.1-8b"
SHARD_GB = 4.65  # 5 GB shards, as Hugging Face publishes this model
DIRECT_BLOCK = 64 << 20


def checkpoint_dir() -> Path:
    path = Path(os.environ.get("RTPLLM_BENCH_DIR", "/root/scratch")) / f"{SHAPE}-5gb-shards"
    if not (path / "config.json").exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rtpllm.tools.random_checkpoint", "--shape", SHAPE, "--out", str(path),
                        "--max-shard-gb", str(SHARD_GB)], check=True)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


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


def disk_floor_gbps(files: list[str], threads: int = 8) -> float:
    """O_DIRECT read rate of the files: `threads` readers of 64 MiB aligned blocks (no copies)."""
    drop_page_cache(files)
    blocks = [(path, offset) for path in files for offset in range(0, os.path.getsize(path), DIRECT_BLOCK)]
    lock = threading.Lock()
    total = [0]

    def reader() -> None:
        buffer = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned, as O_DIRECT requires
        fds = {}
        while True:
            with lock:
                if not blocks:
                    break
                path, offset = blocks.pop(0)
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
    torch.cuda.empty_cache()
    return nbytes / 1e9 / best


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


def full_load_seconds(path: Path) -> float:
    start = time.perf_counter()
    loaded = load_model_and_tokenizer(str(path), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del loaded
    _free()
    return seconds


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
    torch.cuda.empty_cache()


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    path = checkpoint_dir()
    files = safetensors_files(str(path))
    total_gb = sum(os.path.getsize(f) for f in files) / 1e9
    arch = LlamaArch.from_hf_config(read_json(str(path / "config.json")), source="config.json")
    rows = []
    notes = []

    def record(name, value, unit, ceiling="", ratio=None, **extra):
        rows.append(row(name, value, unit, ceiling, ratio, **extra))
        print(f"{name}: {value:.3f} {unit}" + (f"  ({ratio:.3f}x {ceiling})" if ratio is not None else ""), flush=True)

    disk_gbps = max(disk_floor_gbps(files, 8), disk_floor_gbps(files, 16))
    disk_s = total_gb / disk_gbps
    h2d_gbps = h2d_floor_gbps()
    h2d_s = total_gb / h2d_gbps
    record("disk O_DIRECT read rate (floor)", disk_gbps, "GB/s")
    record("pinned host->device rate (floor)", h2d_gbps, "GB/s")

    still_cached = drop_page_cache(files)
    if still_cached > 0.05:
        notes.append(f"page cache kept {still_cached:.0%} of the files after DONTNEED: 'cold' is partly warm")
    cold_s = our_load_seconds(path, arch)
    record(f"ours cold ({total_gb:.1f} GB, pages dropped)", cold_s, "s", "disk floor", cold_s / disk_s,
           gbps=total_gb / cold_s, floor_s=disk_s)
    warm_page_cache(files)
    warm_s = min(our_load_seconds(path, arch) for _ in range(2))
    record(f"ours warm ({total_gb:.1f} GB, page cache)", warm_s, "s", "H2D floor", warm_s / h2d_s,
           gbps=total_gb / warm_s, floor_s=h2d_s)
    record("load_model_and_tokenizer warm (model build + weights + tokenizer)", full_load_seconds(path), "s")

    if not args.quick:
        seconds = transformers_seconds(path)
        record("transformers from_pretrained warm", seconds, "s", "ours warm", seconds / warm_s)
        try:
            seconds = fastsafetensors_seconds(files)
            record("fastsafetensors warm (nogds)", seconds, "s", "ours warm", seconds / warm_s)
        except ImportError:
            notes.append("fastsafetensors is not installed: skipped")
        except Exception as e:  # its API moved, or it failed on this machine: the rest still counts
            notes.append(f"fastsafetensors failed: {type(e).__name__}: {e}")
        from bench_e2e_llama8b import serve_startup_seconds

        serve_startup_seconds(path)  # warms imports, the page cache and compiled kernels' caches
        serve_s = serve_startup_seconds(path)
        record("rtpllm serve start -> first response (warm)", serve_s, "s", "goal 8 s", serve_s / 8.0)
    for note in notes:
        print("note:", note)
    write_json(args.json, "load", rows, device=device_name(), checkpoint_gb=total_gb, notes=notes)


if __name__ == "__main__":
    main()
