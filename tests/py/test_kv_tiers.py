"""Tiers below the KV pool, end to end on the CPU: prefixes pushed out of a small pool come back
from host memory, or from disk, with the same greedy tokens as without tiers; a restarted engine
finds the disk's blocks; /metrics reports each tier."""

import httpx

from kv_tier_workload import assert_idle, expected_outputs, generate, make_llm, prompts, tier_stats
from server_harness import RunningServer, build_async_engine
from checkpoints import checkpoint_path


def test_host_tier_gives_the_same_tokens_and_serves_evicted_prefixes():
    llm = make_llm()  # the host tier is on by default
    assert generate(llm, prompts()) == expected_outputs()
    host = tier_stats(llm)["host"]
    assert host.loaded_blocks >= 5 * 4, "second uses of evicted prefixes must load from the host tier"
    assert host.load_bytes == host.loaded_blocks * host.bytes_per_block
    assert host.saved_blocks > 0 and host.save_bytes == host.saved_blocks * host.bytes_per_block
    assert host.hit_blocks >= host.loaded_blocks and host.queries > 0
    assert host.load_latency_count > 0 and host.load_latency_buckets[-1] == host.load_latency_count
    stats = llm.engine.stats()
    assert stats.kv_tier_hit_tokens == host.loaded_blocks * 16
    assert stats.kv_tier_failed_loads == 0
    assert_idle(llm)


def test_disk_tier_alone_gives_the_same_tokens(tmp_path):
    llm = make_llm(kv_host_cache_gib=0, kv_disk_cache_dir=str(tmp_path))
    assert generate(llm, prompts()) == expected_outputs()
    disk = tier_stats(llm)["disk"]
    assert set(tier_stats(llm)) == {"disk"}
    assert disk.loaded_blocks >= 5 * 4 and disk.load_bytes == disk.loaded_blocks * disk.bytes_per_block
    assert disk.failed_loads == 0 and disk.enabled
    assert_idle(llm)


def test_restart_finds_the_disk_tier(tmp_path):
    first = make_llm(kv_host_cache_gib=0.01, kv_disk_cache_dir=str(tmp_path))
    batch = prompts()[:6]
    assert generate(first, batch) == expected_outputs()[:6]
    first.engine.close()  # lets the last saves and disk writes land
    assert any(p.suffix == ".kvb" for p in tmp_path.iterdir())

    second = make_llm(kv_disk_cache_dir=str(tmp_path))
    assert generate(second, batch[:1], wave=1) == expected_outputs()[:1]
    disk = tier_stats(second)["disk"]
    assert disk.loaded_blocks == 5, "the restarted engine's first request loads its prefix from disk"
    assert tier_stats(second)["host"].loaded_blocks == 0
    assert_idle(second)


def test_disk_hits_are_promoted_to_the_host_tier(tmp_path):
    first = make_llm(kv_host_cache_gib=0.01, kv_disk_cache_dir=str(tmp_path))
    batch = prompts()[:6]
    assert generate(first, batch) == expected_outputs()[:6]
    first.engine.close()

    second = make_llm(kv_disk_cache_dir=str(tmp_path))
    assert generate(second, batch[:1], wave=1) == expected_outputs()[:1]  # its prefix: 5 blocks from disk
    assert tier_stats(second)["disk"].loaded_blocks == 5
    assert generate(second, batch[1:5]) == expected_outputs()[1:5]  # other prefixes push it out of the pool
    assert generate(second, batch[:1], wave=1) == expected_outputs()[:1]
    host = tier_stats(second)["host"]
    assert host.loaded_blocks >= 3, "the prefix loaded from disk was copied up into the host tier"
    assert_idle(second)


def test_metrics_report_each_tier():
    engine = build_async_engine(checkpoint_path("llama3"), num_blocks=16, max_num_seqs=3)
    with RunningServer(engine) as server:
        for prompt in prompts()[:8]:  # the first two return after six others pushed them out
            reply = httpx.post(server.url + "/v1/completions", timeout=60, json=dict(
                model="llama3", prompt=prompt, max_tokens=2, temperature=0.0, ignore_eos=True))
            assert reply.status_code == 200, reply.text
        text = httpx.get(server.url + "/metrics").text
        assert 'rtpllm:kv_tier_loaded_blocks_total{model_name="llama3",tier="host"}' in text
        assert server.metric("kv_tier_loaded_blocks_total") >= 10
        assert server.metric("kv_tier_load_bytes_total") > 0
        assert server.metric("kv_tier_saved_blocks_total") > 0
        assert server.metric("kv_tier_hit_tokens_total") >= 160
        assert server.metric("kv_tier_load_latency_seconds_count") >= 2
        assert server.metric("kv_tier_capacity_bytes") > 0
        assert server.metric("kv_tier_used_bytes") > 0
        assert server.metric("kv_tier_enabled") == 1
        assert server.metric("kv_tier_recomputes_total") == 0
        assert server.metric("num_requests_waiting_for_kv") == 0
