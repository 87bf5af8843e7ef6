"""rtpllm._C kvstore bindings on the CPU build: layout registration, the copy engine, the host and
disk tiers behind the coordinator, a restart that keeps the disk cache. The C++ tests
(tests/cpp/kvstore_*_test.cc) cover the fault cases in depth."""

import time

import numpy as np
import pytest
import torch

from kv_pools import block_of, layout_of, make_pool
from rtpllm import _C


def poll(connector, handle, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while (state := connector.poll(handle)) == _C.TransferState.PENDING:
        assert time.monotonic() < deadline, "transfer still pending"
        time.sleep(0.001)
    return state


@pytest.fixture
def pool():
    return make_pool(num_layers=3, num_blocks=12, block_size=4, num_kv_heads=3, head_dim=10)


def test_layout_describes_the_pool_and_rejects_bad_fields(pool):
    layout = layout_of(pool)
    assert (layout.num_layers, layout.block_bytes()) == (3, 4 * 3 * 10 * 2)
    assert layout.bytes_per_block() == 2 * 3 * layout.block_bytes()
    layout.head_dim = 0
    with pytest.raises(ValueError, match="head_dim"):  # every engine validates the layout it is given
        _C.CpuKVCopyEngine(layout)
    with pytest.raises(ValueError, match="HOST"):
        bad = layout_of(pool)
        bad.memory = _C.MemoryKind.CUDA
        _C.CpuKVCopyEngine(bad)


def test_copy_engine_round_trip_through_host_buffers(pool):
    engine = _C.CpuKVCopyEngine(layout_of(pool))
    nbytes = engine.layout.bytes_per_block()
    buffers = [_C.HostBuffer(engine.host_allocator, nbytes) for _ in range(3)]
    ticket = engine.submit(_C.CopyDirection.POOL_TO_HOST, [7, 0, 11], [b.address for b in buffers])
    assert engine.wait(ticket) == _C.TransferState.DONE
    host = torch.from_numpy(np.asarray(buffers[0])).view(torch.bfloat16)
    assert torch.equal(host, block_of(pool, 7).flatten())
    expected = [block_of(pool, b).clone() for b in (7, 0, 11)]
    ticket = engine.submit(_C.CopyDirection.HOST_TO_POOL, [1, 2, 3], [b.address for b in buffers])
    assert engine.wait(ticket) == _C.TransferState.DONE
    for target, want in zip((1, 2, 3), expected):
        assert torch.equal(block_of(pool, target), want)
    with pytest.raises(ValueError, match="outside"):
        engine.submit(_C.CopyDirection.POOL_TO_HOST, [12], [buffers[0].address])
    with pytest.raises(ValueError, match="length"):
        engine.submit(_C.CopyDirection.POOL_TO_HOST, [1, 2], [buffers[0].address])


def make_tiers(pool, directory, host_blocks=2, disk_blocks=16, identity=7):
    engine = _C.CpuKVCopyEngine(layout_of(pool))
    options = _C.DiskTierOptions()
    options.directory = str(directory)
    options.cache_identity = identity
    options.capacity_bytes = disk_blocks * (4096 + engine.layout.bytes_per_block() + 4096)
    disk = _C.DiskTier(engine, options)
    host = _C.HostTier(engine, host_blocks * engine.layout.bytes_per_block(), disk)
    return _C.TieredKVConnector([host, disk], load_timeout_s=5.0), host, disk


def test_tiers_serve_blocks_evicted_from_the_host_from_disk(pool, tmp_path):
    tiers, host, disk = make_tiers(pool, tmp_path)
    hashes = [101, 102, 103, 104]
    saved = {h: block_of(pool, b).clone() for h, b in zip(hashes, range(4))}
    for block, h in enumerate(hashes):
        assert poll(tiers, tiers.save([h], [block])) == _C.TransferState.DONE
        disk.flush()
    assert tiers.match(hashes + [999]) == 4
    assert not host.contains(101) and host.contains(104)
    assert poll(tiers, tiers.load(hashes, [8, 9, 10, 11])) == _C.TransferState.DONE
    for block, h in zip((8, 9, 10, 11), hashes):
        assert torch.equal(block_of(pool, block), saved[h])
    host_stats, disk_stats = tiers.stats()
    assert (host_stats.name, disk_stats.name) == ("host", "disk")
    assert (host_stats.loaded_blocks, disk_stats.loaded_blocks) == (2, 2)
    assert host_stats.capacity_blocks == 2 and disk_stats.used_blocks == 4 and disk_stats.enabled
    assert len(host_stats.load_latency_s) == 1
    with pytest.raises(ValueError):
        tiers.poll(12345)


def test_restart_keeps_the_disk_cache(pool, tmp_path):
    tiers, _, disk = make_tiers(pool, tmp_path)
    assert poll(tiers, tiers.save([5, 6], [0, 1])) == _C.TransferState.DONE
    disk.flush()
    want = block_of(pool, 1).clone()
    del tiers, disk
    tiers, host, _ = make_tiers(pool, tmp_path)
    assert tiers.match([5, 6]) == 2 and not host.contains(5)
    assert poll(tiers, tiers.load([6], [4])) == _C.TransferState.DONE
    assert torch.equal(block_of(pool, 4), want)
    other, _, _ = make_tiers(pool, tmp_path, identity=8)  # another model sharing the directory
    assert other.match([5, 6]) == 0


def test_bad_tier_arguments_raise_value_error(pool, tmp_path):
    engine = _C.CpuKVCopyEngine(layout_of(pool))
    with pytest.raises(ValueError, match="capacity_bytes"):
        _C.HostTier(engine, 10)
    options = _C.DiskTierOptions()
    options.directory = str(tmp_path)
    with pytest.raises(ValueError, match="capacity_bytes"):
        _C.DiskTier(engine, options)
    with pytest.raises(ValueError, match="load_timeout_s"):
        _C.TieredKVConnector([_C.HostTier(engine, 1 << 20)], load_timeout_s=0.0)


def test_corrupt_block_file_is_a_failed_load_with_one_warning(pool, tmp_path):
    tiers, host, disk = make_tiers(pool, tmp_path, host_blocks=1)
    for block, h in enumerate((1, 2)):
        assert poll(tiers, tiers.save([h], [block])) == _C.TransferState.DONE
        disk.flush()
    assert not host.contains(1)  # only on disk now
    (path,) = [p for p in tmp_path.iterdir() if p.name == f"{1:016x}.kvb"]
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    before = block_of(pool, 9).clone()
    assert poll(tiers, tiers.load([1], [9])) == _C.TransferState.FAILED
    assert torch.equal(block_of(pool, 9), before)  # the bad bytes never reached the pool
    (warning,) = disk.take_warnings()
    assert "checksum" in warning
    assert tiers.match([1]) == 0 and not path.exists()
    assert tiers.stats()[1].failed_loads == 1
