"""The router's policy layer without servers: lanes, the three policies, the cache view, options."""

import asyncio

import pytest

from rtpllm.router.backend import Backend, BackendPool
from rtpllm.router.config import RouterConfig
from rtpllm.router.kv_view import KVView, prefix_block_hashes
from rtpllm.router.policy import LaneGate, RoutingInput, RoutingPolicy

URLS = ("http://a:1", "http://b:1", "http://c:1")


def config(**overrides) -> RouterConfig:
    return RouterConfig(backends=overrides.pop("backends", URLS), **overrides)


def identity_reply(snapshot=(), instance="i"):
    return {"instance_id": instance, "cursor": 0, "block_size": 4, "root_block_hash": 0, "extra_key": 0,
            "resync": "subscribe", "snapshot": {"device": list(snapshot)}}


def policy_with(cfg: RouterConfig) -> RoutingPolicy:
    pool = BackendPool(cfg)
    for b in pool.backends:
        b.view.apply(identity_reply())
    return RoutingPolicy(cfg, pool)


def test_long_prompts_are_capped_per_instance_and_never_fill_every_instance():
    gate = LaneGate(config(long_prompt_threshold=100, max_long_per_instance=2))
    a, b, c = (Backend(u) for u in URLS)
    assert gate.is_long(RoutingInput(None, 101)) and not gate.is_long(RoutingInput(None, 100))
    assert gate.candidates([a, b, c], long=True) == [a, b, c]
    a.admit(500, long=True)
    b.admit(500, long=True)
    # c is the last instance without a long prefill: it stays free for short requests.
    assert gate.candidates([a, b, c], long=True) == [a, b]
    a.admit(500, long=True)
    assert gate.candidates([a, b, c], long=True) == [b]
    assert gate.candidates([a, b, c], long=False) == [a, b, c]
    lone = Backend("http://d:1")
    lone.admit(500, long=True)
    lone.admit(500, long=True)
    assert gate.candidates([lone], long=True) == []  # at its cap: the next long prompt waits


def test_a_configured_long_lane_takes_long_prompts_and_short_ones_stay_off_it():
    cfg = config(long_prompt_threshold=100, long_lane=("http://c:1",))
    gate = LaneGate(cfg)
    a, b, c = Backend(URLS[0]), Backend(URLS[1]), Backend(URLS[2], long_lane=True)
    assert gate.candidates([a, b, c], long=True) == [c]
    assert gate.candidates([a, b, c], long=False) == [a, b]
    assert gate.candidates([a, b], long=True) == [a, b]  # the lane is down: borrow the others


def test_cache_aware_prefers_the_holder_unless_its_queue_outweighs_the_saving():
    cfg = config(policy="cache_aware", long_prompt_threshold=None)
    policy = policy_with(cfg)
    a, b, c = policy.pool.backends
    tokens = list(range(1, 42))  # 10 full blocks of 4 before the last token
    hashes = prefix_block_hashes(tokens, 4, 0)
    b.view.apply(identity_reply(hashes, instance="b"))
    request = RoutingInput(tokens, len(tokens))
    choice = policy.choose(request, [a, b, c])
    assert choice.backend is b and choice.hit_tokens == 40
    b.pending_prefill_tokens = 39  # queue there < 40 tokens saved: still b
    assert policy.choose(request, [a, b, c]).backend is b
    b.pending_prefill_tokens = 400  # a long prefill in front: compute it elsewhere
    assert policy.choose(request, [a, b, c]).backend is not b


def test_queued_work_counts_only_the_prompt_tokens_not_expected_cached():
    cfg = config(policy="cache_aware", long_prompt_threshold=None)
    policy = policy_with(cfg)
    a, b, c = policy.pool.backends
    tokens = list(range(1, 42))
    b.view.apply(identity_reply(prefix_block_hashes(tokens, 4, 0), instance="b"))
    request = RoutingInput(tokens, len(tokens))
    # Three turns of the same conversation dispatched to its holder: 1 token of work each.
    tickets = [policy.dispatch(policy.choose(request, [a, b, c]), request) for _ in range(3)]
    assert [t.backend for t in tickets] == [b, b, b] and b.pending_prefill_tokens == 3
    assert policy.choose(request, [a, b, c]).backend is b  # 3 tokens queued << 40 tokens saved
    for t in tickets:
        t.first_output()
    assert b.pending_prefill_tokens == 0 and b.decoding == 3
    for t in tickets:
        t.close()
    assert b.in_flight == 0 and b.decoding == 0


def test_other_clients_load_is_read_against_the_routers_count_when_the_report_came():
    policy = policy_with(config(policy="cache_aware", long_prompt_threshold=None))
    a, b, _ = policy.pool.backends
    tickets = [a.admit(10, False) for _ in range(4)]
    a.take_load_report({"num_running": 4, "num_waiting": 2})
    assert a.foreign_requests == 2  # two requests there did not come from this router
    for t in tickets:
        t.close()  # finished after the report: no phantom load from the stale count
    assert a.foreign_requests == 2
    b.take_load_report({"num_running": 0, "num_waiting": 0})
    request = RoutingInput(list(range(1, 10)), 9)
    assert policy.choose(request, [a, b]).backend is b  # a still carries the other clients' two


def test_a_prefix_in_a_lower_tier_counts_as_a_weighted_hit():
    cfg = config(policy="cache_aware", long_prompt_threshold=None, host_hit_weight=0.75, disk_hit_weight=0.25)
    policy = policy_with(cfg)
    a, b, c = policy.pool.backends
    tokens = list(range(1, 42))
    hashes = prefix_block_hashes(tokens, 4, 0)  # 10 blocks
    b.view.apply({**identity_reply(instance="b"), "snapshot": {"device": hashes[:2], "host": hashes[:8]}})
    c.view.apply({**identity_reply(instance="c"), "snapshot": {"disk": hashes}})
    assert b.view.matched_by_tier(hashes) == {"device": 2, "host": 6}  # the host continues the device's run
    assert c.view.matched_by_tier(hashes) == {"device": 0, "disk": 10}
    request = RoutingInput(tokens, len(tokens))
    choice = policy.choose(request, [a, b, c])
    assert choice.backend is b and choice.hit_tokens == 4 * (2 + 0.75 * 6)  # 26 tokens vs c's 10
    b.pending_prefill_tokens = 20  # its queue now outweighs the difference: c's disk copy wins
    assert policy.choose(request, [a, b, c]).backend is c
    # A hole in the chain ends the match, whatever the tiers below hold.
    b.view.apply({**identity_reply(instance="b"), "snapshot": {"host": hashes[:3] + hashes[4:]}})
    assert b.view.matched_by_tier(hashes) == {"device": 0, "host": 3}


def test_a_prompt_just_routed_counts_as_cached_there_until_it_expires():
    view = KVView()
    view.apply(identity_reply())
    view.predict([1, 2, 3], ttl_s=60)
    assert view.matched_blocks([1, 2, 3, 4]) == 3
    view.predict([5], ttl_s=-1)
    assert view.matched_blocks([5]) == 0
    view.apply({"instance_id": "i", "cursor": 2, "block_size": 4, "root_block_hash": 0,
                "events": {"kinds": ["stored", "removed"], "tiers": ["device", "device"], "hashes": [9, 1]}})
    assert view.matched_blocks([9]) == 1 and view.matched_blocks([1]) == 1  # 1 is still predicted
    view.drop()
    assert view.matched_blocks([1, 9]) == 0 and view.cursor is None


def test_round_robin_and_least_loaded_baselines():
    policy = policy_with(config(policy="round_robin"))
    backends = policy.pool.backends
    request = RoutingInput([1, 2, 3], 3)
    assert [policy.choose(request, backends).backend for _ in range(4)] == [*backends, backends[0]]
    policy = policy_with(config(policy="least_loaded"))
    a, b, c = policy.pool.backends
    a.admit(10, False)
    c.admit(10, False)
    assert policy.choose(request, [a, b, c]).backend is b


def test_a_long_prompt_waits_in_the_router_for_a_slot():
    async def main():
        policy = policy_with(config(backends=URLS[:1], long_prompt_threshold=10))
        (a,) = policy.pool.backends
        ticket = a.admit(50, long=True)
        waiting = asyncio.ensure_future(policy.route(RoutingInput(None, 50)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        short = await policy.route(RoutingInput(None, 5))
        assert short.backend is a  # short requests are not held back
        ticket.first_output()  # the long prompt's prefill is done: the slot frees up
        choice = await asyncio.wait_for(waiting, 2)
        assert choice.backend is a
        a.mark_down("test")
        assert await policy.route(RoutingInput(None, 5)) is None

    asyncio.run(main())


@pytest.mark.parametrize("overrides, field", [
    (dict(prefill=("http://p:1",)), "prefill"), (dict(policy="random"), "policy"),
    (dict(long_lane=("http://x:1",)), "long_lane"), (dict(backends=()), "backend"),
    (dict(backends=("a:1",)), "backend"), (dict(cache_weight=-1), "cache_weight"),
    (dict(max_long_per_instance=0), "max_long_per_instance"), (dict(api_key=""), "api_key"),
    (dict(host_hit_weight=1.5), "host_hit_weight"), (dict(disk_hit_weight=-0.1), "disk_hit_weight"),
])
def test_bad_options_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        config(**overrides)


def test_the_cli_maps_onto_the_config_and_refuses_mixed_modes(capsys, monkeypatch):
    from rtpllm.router.cli import config_from_args
    from rtpllm.serving.cli import build_parser, main

    monkeypatch.setenv("RTPLLM_API_KEY", "from-env")
    args = build_parser().parse_args(["router", "--backend", "http://a:1/", "--backend", "http://b:1",
                                      "--long-lane", "http://b:1", "--policy", "least_loaded",
                                      "--long-prompt-threshold", "0", "--allowed-hosts", "localhost, 127.0.0.1"])
    cfg = config_from_args(args)
    assert cfg.backends == ("http://a:1", "http://b:1") and cfg.long_lane == ("http://b:1",)
    assert cfg.policy == "least_loaded" and cfg.long_prompt_threshold is None and cfg.api_key == "from-env"
    assert cfg.allowed_hosts == ("localhost", "127.0.0.1")
    args = build_parser().parse_args(["router", "--prefill", "http://p:1", "http://p:2", "--decode", "http://d:1",
                                      "--pd-retry", "--pd-prefill-timeout", "7", "--pd-reserve-timeout", "3"])
    cfg = config_from_args(args)
    assert cfg.pd and cfg.prefill == ("http://p:1", "http://p:2") and cfg.decode == ("http://d:1",)
    assert cfg.pd_retry and cfg.pd_prefill_timeout_s == 7 and cfg.pd_reserve_timeout_s == 3
    assert main(["router", "--backend", "http://a:1", "--prefill", "http://p:1", "--decode", "http://d:1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_decode_picks_the_lowest_kv_usage_band_then_the_fewest_requests_in_flight():
    from rtpllm.router.policy import least_loaded_decode

    a, b, c = (Backend(u) for u in URLS)
    a.load, b.load, c.load = {"kv_usage": 0.31}, {"kv_usage": 0.38}, {"kv_usage": 0.75}
    assert least_loaded_decode([a, b, c]) is a
    a.admit(100, long=False)  # within one 10% band the router's own count decides (the poll lags)
    assert least_loaded_decode([a, b, c]) is b
    b.admit(100, long=False)
    b.admit(100, long=False)
    assert least_loaded_decode([a, b, c]) is a
    c.load = {}  # not polled yet: counts as empty
    assert least_loaded_decode([a, b, c]) is c
    assert least_loaded_decode([]) is None
