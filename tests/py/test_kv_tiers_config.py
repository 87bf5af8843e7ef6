"""KV tier options (config, CLI) and the cache identity that keeps tiers of different models or
configurations apart."""

import argparse
import shutil

import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm.config import CacheConfig, EngineConfig
from rtpllm.engine.cache_identity import cache_identity
from rtpllm.engine.kv_tiers import host_cache_bytes
from rtpllm.serving.engine_args import add_engine_args, engine_config_from_args


@pytest.mark.parametrize("options, field", [
    (dict(kv_host_cache_gib=-1.0), "kv_host_cache_gib"),
    (dict(kv_disk_cache_gib=0.0), "kv_disk_cache_gib"),
    (dict(kv_load_timeout_s=0.0), "kv_load_timeout_s"),
    (dict(kv_disk_cache_dir=""), "kv_disk_cache_dir"),
    (dict(kv_disk_cache_dir="/tmp/x", enable_prefix_caching=False), "kv_disk_cache_dir"),
])
def test_bad_tier_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig.from_kwargs(**options)


def test_host_tier_default_is_small_and_zero_turns_it_off():
    default = host_cache_bytes(CacheConfig())
    assert 0 < default <= 4 << 30
    assert host_cache_bytes(CacheConfig(kv_host_cache_gib=0)) == 0
    assert host_cache_bytes(CacheConfig(kv_host_cache_gib=0.5)) == 1 << 29


def test_cli_flags_map_onto_the_config():
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(["--kv-host-cache-gib", "0", "--kv-disk-cache-dir", "/tmp/kv", "--kv-disk-cache-gib", "2",
                              "--kv-load-timeout-s", "3"])
    cache = engine_config_from_args(args).cache
    assert (cache.kv_host_cache_gib, cache.kv_disk_cache_dir, cache.kv_disk_cache_gib, cache.kv_load_timeout_s) == (
        0.0, "/tmp/kv", 2.0, 3.0)
    assert engine_config_from_args(parser.parse_args([])).cache.kv_host_cache_gib is None


def _identity(path, dtype=torch.float32, block_size=16):
    return cache_identity(str(path), kv_dtype=dtype, block_size=block_size, num_layers=2, num_kv_heads=2, head_dim=32)


def test_cache_identity_follows_weights_dtype_and_layout(tmp_path):
    path = checkpoint_path("llama3")
    base = _identity(path)
    assert base == _identity(path) and base != 0
    assert _identity(path, dtype=torch.bfloat16) != base
    assert _identity(path, block_size=32) != base
    assert _identity(checkpoint_path("mistral")) != base
    # A fine-tune: same config and safetensors header, (slightly) other values in every tensor.
    tuned = tmp_path / "tuned"
    shutil.copytree(path, tuned)
    weights = next(tuned.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    for i in range(header_end, len(data), 4):  # the lowest mantissa bit of every float32
        data[i] ^= 0x01
    weights.write_bytes(bytes(data))
    assert _identity(tuned) != base
    # A copy elsewhere is the same model.
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert _identity(copy) == base
