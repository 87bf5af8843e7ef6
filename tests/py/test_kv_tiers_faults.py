"""Disk tier faults: a corrupted, truncated or foreign block file is a miss or a failed load (the
tokens are recomputed), a full disk stops the tier; the answers stay exact every time."""

import shutil

import pytest

from checkpoints import checkpoint_path
from kv_tier_workload import assert_idle, expected_outputs, generate, make_llm, prompts, tier_stats
from rtpllm import LLM

FIRST_USES = 6  # prompts()[:6]: each system prompt once


@pytest.fixture(scope="module")
def populated_disk(tmp_path_factory):
    """A disk tier directory holding every block of the workload's first six requests."""
    path = tmp_path_factory.mktemp("kv-disk")
    llm = make_llm(kv_host_cache_gib=0, kv_disk_cache_dir=str(path))
    generate(llm, prompts()[:FIRST_USES])
    llm.engine.close()
    files = sorted(path.glob("*.kvb"))
    assert len(files) >= 5 * FIRST_USES
    return path


def _copy(populated_disk, tmp_path):
    target = tmp_path / "disk"
    shutil.copytree(populated_disk, target)
    return target, sorted(target.glob("*.kvb"))


def _run_on(disk_dir) -> LLM:
    llm = make_llm(kv_host_cache_gib=0, kv_disk_cache_dir=str(disk_dir))
    assert generate(llm, prompts()[:FIRST_USES]) == expected_outputs()[:FIRST_USES]
    return llm


def test_intact_copy_is_served_from_disk(populated_disk, tmp_path):
    disk_dir, _ = _copy(populated_disk, tmp_path)
    llm = _run_on(disk_dir)
    assert tier_stats(llm)["disk"].loaded_blocks >= 5 * FIRST_USES
    assert_idle(llm)


def test_corrupted_block_files_are_recomputed(populated_disk, tmp_path):
    disk_dir, files = _copy(populated_disk, tmp_path)
    for f in files:  # one flipped byte in every payload: headers are intact, checksums are not
        data = bytearray(f.read_bytes())
        data[4096 + 100] ^= 0xFF
        f.write_bytes(bytes(data))
    llm = _run_on(disk_dir)
    disk = tier_stats(llm)["disk"]
    assert disk.loaded_blocks == 0
    assert disk.failed_loads > 0 and llm.engine.stats().kv_tier_failed_loads > 0
    assert_idle(llm)


def test_truncated_block_files_are_misses_or_recomputed(populated_disk, tmp_path):
    disk_dir, files = _copy(populated_disk, tmp_path)
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[:len(data) // 2])
    llm = _run_on(disk_dir)
    assert tier_stats(llm)["disk"].loaded_blocks == 0
    assert_idle(llm)


def test_files_of_another_model_never_match(populated_disk, tmp_path):
    disk_dir, files = _copy(populated_disk, tmp_path)
    other_dir = tmp_path / "other"
    other = LLM(model=checkpoint_path("qwen3"), num_blocks=16, block_size=16, kv_host_cache_gib=0,
                kv_disk_cache_dir=str(other_dir))
    other.generate(prompts()[:2], None)
    other.engine.close()
    foreign = sorted(other_dir.glob("*.kvb"))
    assert foreign
    for i, f in enumerate(files):  # our names, another model's contents
        shutil.copyfile(foreign[i % len(foreign)], f)
    for f in foreign:  # and the other model's own files, side by side with ours
        shutil.copyfile(f, disk_dir / f.name)
    llm = _run_on(disk_dir)
    assert tier_stats(llm)["disk"].loaded_blocks == 0
    assert_idle(llm)


def test_full_disk_stops_the_tier_and_serving_goes_on(tmp_path):
    # A quota below one block file: the first write finds the disk full and the tier stops.
    llm = make_llm(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_gib=1e-6)
    assert generate(llm, prompts()) == expected_outputs()
    tiers = tier_stats(llm)
    assert not tiers["disk"].enabled and tiers["disk"].used_blocks == 0
    assert tiers["host"].loaded_blocks > 0, "the host tier keeps serving"
    assert_idle(llm)
