"""The CUDA KV copy engine (cuda/kvstore) against torch: block copies between a paged GPU pool and
pinned host buffers, both methods (gather/scatter kernel, batched cudaMemcpyAsync), odd shapes
and block lists, padded block strides, ordering after the compute stream, and the host and disk
tiers running on it. Bandwidth is in bench/gpu/bench_kv_copy.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rtpllm import _C

METHODS = ["KERNEL", "MEMCPY", "STAGED", "HYBRID"]  # _C.CudaCopyMethod members (absent from CPU builds, where these tests skip)
# (layers, block_size, kv_heads, head_dim, dtype, pad_tokens): 8B-like; odd sizes whose segments
# are not 16-byte multiples (narrow accesses); fp32 with padded blocks (strided pool).
SHAPES = [(4, 16, 8, 128, torch.bfloat16, 0), (3, 3, 3, 5, torch.bfloat16, 0), (2, 5, 1, 36, torch.float32, 2)]


def make_pool(layers, blocks, block_size, heads, head_dim, dtype, pad_tokens):
    """Per layer [2, blocks, block_size, heads, head_dim], viewed out of a tensor with pad_tokens
    more tokens per block, so that blocks are block_stride_bytes > block_bytes apart."""
    full = [torch.randn(2, blocks, block_size + pad_tokens, heads, head_dim, device="cuda").to(dtype) for _ in range(layers)]
    return full, [t[:, :, :block_size] for t in full]


def layout_of(pool):
    first = pool[0]
    _, num_blocks, block_size, num_kv_heads, head_dim = first.shape
    return _C.KVLayout(memory=_C.MemoryKind.CUDA, device_index=first.device.index or 0, num_blocks=num_blocks,
                       block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       element_bytes=first.element_size(), block_stride_bytes=first.stride(1) * first.element_size(),
                       layers=[_C.KVLayerAddress(t[0].data_ptr(), t[1].data_ptr()) for t in pool])

def block_of(pool, block):
    """One block's K and V of every layer, layer-major, K then V (the host buffer's order), as bytes."""
    return torch.cat([t[kv, block].contiguous().view(torch.uint8).flatten() for t in pool for kv in (0, 1)]).cpu()


def host_bytes(buffer):
    return torch.from_numpy(np.asarray(buffer))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[0]}-bs{s[1]}-h{s[2]}-d{s[3]}-{str(s[4])[6:]}-pad{s[5]}")
def test_round_trip_gpu_pool_pinned_host(method, shape):
    layers, block_size, heads, head_dim, dtype, pad = shape
    full, pool = make_pool(layers, 37, block_size, heads, head_dim, dtype, pad)
    padding_before = [t[:, :, block_size:].clone() for t in full]
    engine = _C.CudaKVCopyEngine(layout_of(pool), torch.cuda.current_stream().cuda_stream, getattr(_C.CudaCopyMethod, method))
    nbytes = engine.layout.bytes_per_block()
    sources = [36, 0, 17, 5, 33, 8, 21]  # odd count, scattered, both ends of the pool
    buffers = [_C.HostBuffer(engine.host_allocator, nbytes) for _ in sources]
    ticket = engine.submit(_C.CopyDirection.POOL_TO_HOST, sources, [b.address for b in buffers])
    assert engine.wait(ticket) == _C.TransferState.DONE
    for block, buffer in zip(sources, buffers):
        assert torch.equal(host_bytes(buffer), block_of(pool, block)), f"save of block {block}"

    expected = [block_of(pool, b) for b in sources]
    targets = [1, 35, 2, 30, 19, 4, 11]
    ticket = engine.submit(_C.CopyDirection.HOST_TO_POOL, targets, [b.address for b in buffers])
    while (state := engine.query(ticket)) == _C.TransferState.PENDING:
        pass
    assert state == _C.TransferState.DONE
    for block, want in zip(targets, expected):
        assert torch.equal(block_of(pool, block), want), f"load into block {block}"
    for t, before in zip(full, padding_before):
        assert torch.equal(t[:, :, block_size:], before), "wrote outside the blocks"


@pytest.mark.parametrize("method", METHODS)
def test_save_waits_for_the_compute_stream(method):
    _, pool = make_pool(2, 8, 16, 8, 128, torch.bfloat16, 0)
    compute = torch.cuda.Stream()
    engine = _C.CudaKVCopyEngine(layout_of(pool), compute.cuda_stream, getattr(_C.CudaCopyMethod, method))
    buffer = _C.HostBuffer(engine.host_allocator, engine.layout.bytes_per_block())
    torch.cuda.synchronize()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(50_000_000)  # the "forward pass" still runs when the save is submitted
        for t in pool:
            t[:, 3].fill_(7.0)
    ticket = engine.submit(_C.CopyDirection.POOL_TO_HOST, [3], [buffer.address])
    assert engine.wait(ticket) == _C.TransferState.DONE
    assert torch.equal(host_bytes(buffer).view(torch.bfloat16), torch.full_like(block_of(pool, 3).view(torch.bfloat16), 7.0))


def test_rejects_pageable_host_memory_and_host_pools():
    _, pool = make_pool(1, 4, 16, 8, 128, torch.bfloat16, 0)
    engine = _C.CudaKVCopyEngine(layout_of(pool), torch.cuda.current_stream().cuda_stream)
    pageable = _C.HostBuffer(_C.AlignedHostAllocator(), engine.layout.bytes_per_block())
    with pytest.raises(ValueError, match="pinned"):
        engine.submit(_C.CopyDirection.POOL_TO_HOST, [0], [pageable.address])
    with pytest.raises(ValueError, match="outside"):
        engine.submit(_C.CopyDirection.POOL_TO_HOST, [4], [pageable.address])
    host_layout = layout_of(pool)
    host_layout.memory = _C.MemoryKind.HOST
    with pytest.raises(ValueError):
        _C.CudaKVCopyEngine(host_layout, 0)


def poll(connector, handle, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while (state := connector.poll(handle)) == _C.TransferState.PENDING:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return state


def test_host_and_disk_tiers_on_the_gpu_pool(tmp_path):
    _, pool = make_pool(4, 32, 16, 8, 128, torch.bfloat16, 0)
    engine = _C.CudaKVCopyEngine(layout_of(pool), torch.cuda.current_stream().cuda_stream)
    options = _C.DiskTierOptions()
    options.directory = str(tmp_path)
    options.capacity_bytes = 64 << 20
    options.cache_identity = 1
    disk = _C.DiskTier(engine, options)
    host = _C.HostTier(engine, 4 * engine.layout.bytes_per_block(), disk)
    tiers = _C.TieredKVConnector([host, disk], load_timeout_s=10.0)
    hashes = list(range(100, 110))
    want = {h: block_of(pool, b) for b, h in enumerate(hashes)}
    for b, h in enumerate(hashes):
        assert poll(tiers, tiers.save([h], [b])) == _C.TransferState.DONE
        disk.flush()
    assert tiers.match(hashes) == 10 and not host.contains(100)
    targets = list(range(20, 30))
    assert poll(tiers, tiers.load(hashes, targets)) == _C.TransferState.DONE
    for b, h in zip(targets, hashes):
        assert torch.equal(block_of(pool, b), want[h])
    host_stats, disk_stats = tiers.stats()
    assert host_stats.loaded_blocks == 4 and disk_stats.loaded_blocks == 6
