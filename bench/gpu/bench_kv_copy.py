"""KV block copies of the CUDA copy engine (cuda/kvstore) on a Llama-3.1-8B-shaped pool (32 layers,
8 KV heads, head_dim 128, bf16, 16-token blocks: 2 MiB per block), against pinned host <-> device
bandwidth measured in the same run (one contiguous copy of the same bytes). Goal: ratio >= 0.8.

Rows: save (GPU -> host, D2H) and load (host -> GPU, H2D) of N scattered blocks, for both engine
methods (gather/scatter kernel; one cudaMemcpyAsync per block, layer and K/V), timed from submit()
to the end of wait(), as the tiers use them."""

import statistics
import time

import torch

from bench_util import device_name, parse_args, row, write_json
from rtpllm import _C

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
POOL_BLOCKS = 1024  # 2 GiB of KV


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pinned_copy_s(nbytes: int, to_host: bool, reps: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()

    def copy():
        with torch.cuda.stream(stream):
            (host.copy_(device, non_blocking=True) if to_host else device.copy_(host, non_blocking=True))
        stream.synchronize()

    return median_s(copy, reps)


def main() -> None:
    args = parse_args(__doc__)
    reps = 5 if args.quick else 20
    counts = (16, 64) if args.quick else (1, 4, 16, 64, 256)
    pool = [torch.zeros(2, POOL_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            for _ in range(LAYERS)]
    layout = _C.KVLayout(memory=_C.MemoryKind.CUDA, device_index=torch.cuda.current_device(), num_blocks=POOL_BLOCKS,
                         block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, element_bytes=2,
                         block_stride_bytes=pool[0].stride(1) * 2,
                         layers=[_C.KVLayerAddress(t[0].data_ptr(), t[1].data_ptr()) for t in pool])
    compute_stream = torch.cuda.current_stream().cuda_stream
    block_bytes = layout.bytes_per_block()
    allocator = _C.CudaHostAllocator()
    host = _C.HostBuffer(allocator, block_bytes * max(counts))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for method in ("KERNEL", "MEMCPY"):
        engine = _C.CudaKVCopyEngine(layout, compute_stream, getattr(_C.CudaCopyMethod, method))
        for count in counts:
            blocks = torch.randperm(POOL_BLOCKS, generator=generator)[:count].tolist()
            addresses = [host.address + i * block_bytes for i in range(count)]
            nbytes = count * block_bytes
            for direction, to_host, label in ((_C.CopyDirection.HOST_TO_POOL, False, "H2D load"),
                                              (_C.CopyDirection.POOL_TO_HOST, True, "D2H save")):
                ours = median_s(lambda: engine.wait(engine.submit(direction, blocks, addresses)), reps)
                plain = pinned_copy_s(nbytes, to_host, reps)
                gbps, plain_gbps = nbytes / ours / 1e9, nbytes / plain / 1e9
                rows.append(row(f"kv copy {method.lower()} {label} {count} blocks ({nbytes >> 20} MiB)", gbps, "GB/s",
                                f"pinned {plain_gbps:.1f} GB/s", gbps / plain_gbps, us=ours * 1e6, blocks=count,
                                method=method.lower(), direction=label))
                print(f"[{device_name()}] {method.lower():6s} {label} {count:4d} blocks: {gbps:6.2f} GB/s, "
                      f"pinned contiguous {plain_gbps:6.2f} GB/s, ratio {gbps / plain_gbps:.3f}", flush=True)
        del engine
    write_json(args.json, "kv_copy", rows, shape=dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                                      block_size=BLOCK_SIZE, dtype="bfloat16", bytes_per_block=block_bytes))


if __name__ == "__main__":
    main()
