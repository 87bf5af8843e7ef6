"""What each instance publishes for the router: KV events (stored/evicted block hashes from the C++
block pool, drained every step) and its load, on GET /kv_events and GET /load."""

import httpx
import numpy as np
import pytest

from checkpoints import checkpoint_path
from rtpllm import _C
from rtpllm.engine.instance_report import REMOVED, STORED, InstanceReporter, KVEventBatch, TIER_NAMES
from rtpllm.router.kv_view import KVView, prefix_block_hashes
from rtpllm.serving.kv_events import KVEventHub
from runtime_harness import Driver
from server_harness import RunningServer, build_async_engine

BLOCK = 16


@pytest.fixture(scope="module")
def server():
    with RunningServer(build_async_engine(checkpoint_path("llama3"), max_model_len=256, num_blocks=12)) as running:
        yield running


def poll(server, cursor=None, instance_id=None, timeout=2.0):
    params = {"timeout": timeout}
    if cursor is not None:
        params.update(cursor=cursor, instance_id=instance_id)
    response = httpx.get(server.url + "/kv_events", params=params, timeout=timeout + 10)
    assert response.status_code == 200, response.text
    return response.json()


def complete(server, prompt, max_tokens=2):
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": "llama3", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
    assert response.status_code == 200, response.text


def test_events_report_the_blocks_a_request_stored_under_the_routers_hash_chain(server):
    first = poll(server)
    assert first["resync"] == "subscribe" and first["block_size"] == BLOCK
    prompt = list(range(10, 10 + 3 * BLOCK + 5))
    complete(server, prompt)
    reply = poll(server, first["cursor"], first["instance_id"])
    assert "resync" not in reply
    events = reply["events"]
    stored = {h for k, t, h in zip(events["kinds"], events["tiers"], events["hashes"]) if k == "stored" and t == "device"}
    expected = prefix_block_hashes(prompt, reply["block_size"], reply["root_block_hash"], reply["extra_key"])
    assert len(expected) == 3 and set(expected) <= stored
    assert set(events["tiers"]) <= {"device", "host"}  # the host tier (on by default) saves a copy
    # The router's view, fed the same replies, matches the whole prompt prefix.
    view = KVView()
    view.apply(first)
    view.apply(reply)
    assert view.matched_blocks(expected) == 3


def test_evictions_are_reported_and_the_mirror_follows_the_pool(server):
    start = poll(server)
    for i in range(6):  # 12 blocks: later prompts evict earlier ones
        complete(server, [100 + 7 * i + j for j in range(2 * BLOCK + 1)])
    reply = poll(server, start["cursor"], start["instance_id"])
    assert "removed" in reply["events"]["kinds"]
    view = KVView()
    view.apply(start)
    view.apply(reply)
    assert view.held["device"] == server.app.state.kv_events.held("device")
    snapshot = poll(server)["snapshot"]["device"]
    assert set(snapshot) == view.held["device"]


def test_long_poll_waits_for_an_event_then_answers_empty(server):
    start = poll(server)
    reply = poll(server, start["cursor"], start["instance_id"], timeout=0.3)
    assert reply["events"]["hashes"] == [] and reply["cursor"] == start["cursor"]


def test_a_stale_cursor_or_another_instance_resyncs(server):
    start = poll(server)
    assert poll(server, start["cursor"] + 5, start["instance_id"])["resync"] == "overflow: resync"
    assert poll(server, start["cursor"], "someone-else")["resync"] == "overflow: resync"


def test_bad_parameters_answer_400(server):
    assert httpx.get(server.url + "/kv_events", params={"cursor": "x"}).status_code == 400
    assert httpx.get(server.url + "/kv_events", params={"timeout": 99}).status_code == 400


def test_load_reports_running_requests_and_the_cache_identity(server):
    load = httpx.get(server.url + "/load").json()
    for key in ("num_running", "num_waiting", "tokens_in_flight", "kv_usage", "step_time_s", "num_in_flight"):
        assert key in load
    # The chain's root is the engine's cache identity (model, dtype, layout), not the bare root.
    assert load["block_size"] == BLOCK and isinstance(load["root_block_hash"], int)
    assert load["root_block_hash"] != _C.ROOT_BLOCK_HASH
    assert load["model"] == "llama3" and load["step_time_s"] > 0


def test_the_hub_resyncs_subscribers_that_fell_behind_its_ring():
    hub = KVEventHub(ring_size=4)
    hashes = np.arange(1, 11, dtype=np.uint64)
    hub.publish(KVEventBatch(hashes, np.full(10, STORED, np.uint8), np.zeros(10, np.uint8)))
    assert hub.read(0, hub.instance_id)["resync"] == "overflow: resync"
    assert hub.read(6, hub.instance_id)["events"]["hashes"] == [7, 8, 9, 10]
    hub.publish(KVEventBatch(np.array([3], np.uint64), np.array([REMOVED], np.uint8), np.zeros(1, np.uint8)))
    assert hub.read(None, None)["snapshot"]["device"] == [1, 2, 4, 5, 6, 7, 8, 9, 10]


def test_an_overflowing_engine_log_sends_a_snapshot_that_replaces_the_mirror():
    driver = Driver(num_blocks=32, block_size=4)
    reporter = InstanceReporter(driver.scheduler, block_size=4, root_block_hash=_C.ROOT_BLOCK_HASH, log_capacity=3)
    driver.add(1, list(range(1, 30)), max_new_tokens=2)
    driver.run_until_done()
    batch = reporter.drain_kv_events()
    assert batch is not None and batch.reset is not None and len(batch.hashes) == 0
    assert sorted(batch.reset.tolist()) == sorted(driver.scheduler.cached_block_hashes().tolist())
    assert len(batch.reset) == 7  # 30 computed tokens in blocks of 4
    hub = KVEventHub()
    hub.publish(KVEventBatch(np.array([99], np.uint64), np.zeros(1, np.uint8), np.zeros(1, np.uint8)))
    hub.publish(batch)
    assert hub.held("device") == set(batch.reset.tolist())
    assert reporter.drain_kv_events() is None  # nothing new since


def test_blocks_pushed_to_the_host_tier_are_reported_under_it():
    # A 16-block pool with the host tier (on by default): early prompts' blocks leave the device,
    # and stay held in host memory; the events say so, and the router's view counts them as hits.
    with RunningServer(build_async_engine(checkpoint_path("llama3"), max_model_len=256, num_blocks=16)) as server:
        start = poll(server)
        prompts = [[200 + 11 * i + j for j in range(3 * BLOCK + 1)] for i in range(6)]
        for prompt in prompts:
            complete(server, prompt)
        view = KVView()
        view.apply(start)
        server.wait_until(lambda: prefix_block_hashes(prompts[0], BLOCK, start["root_block_hash"])[0]
                          in server.app.state.kv_events.held("host"), what="the first prompt's blocks in the host tier")
        view.apply(poll(server, start["cursor"], start["instance_id"]))
        assert set(view.held) >= {"device", "host"}
        first = prefix_block_hashes(prompts[0], BLOCK, start["root_block_hash"])
        assert view.matched_blocks(first) == 0  # evicted from the device...
        assert view.matched_by_tier(first) == {"device": 0, "host": 3}  # ...still in host memory
        assert view.held["host"] == server.app.state.kv_events.held("host")


def test_a_resync_snapshot_carries_every_tier():
    hub = KVEventHub()
    hub.publish(KVEventBatch(np.array([5, 6], np.uint64), np.full(2, STORED, np.uint8),
                             np.array([int(_C.KVTier.HOST), int(_C.KVTier.DISK)], np.uint8)))
    assert hub.held("host") == {5} and hub.held("disk") == {6}
    hub.publish(KVEventBatch(np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros(0, np.uint8),
                             reset=np.array([1], np.uint64), reset_tier_hashes=np.array([7, 8], np.uint64),
                             reset_tier_ids=np.array([int(_C.KVTier.HOST), int(_C.KVTier.HOST)], np.uint8)))
    assert hub.held("device") == {1} and hub.held("host") == {7, 8} and hub.held("disk") == set()
    snapshot = hub.read(None, None)["snapshot"]
    assert snapshot == {"device": [1], "host": [7, 8]}
    assert set(TIER_NAMES.values()) >= set(snapshot)
