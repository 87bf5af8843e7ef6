"""The adaptive choice of draft counts, and the speculative decoding metrics."""

from types import SimpleNamespace

from rtpllm.engine.stats import EngineStats
from rtpllm.serving.metrics import _EngineStatsCollector
from rtpllm.spec.adaptive import AdaptiveSpeculation, StepCostModel, default_cost_model, expected_tokens
from rtpllm.spec.stats import SpecCounters


def gpu_controller(k=4, adaptive=True):
    return AdaptiveSpeculation(k, default_cost_model("cuda", None), adaptive=adaptive)


def train(controller, seq_ids, k, accepted, steps=20):
    for _ in range(steps):
        for s in seq_ids:
            controller.record(s, k, accepted)


def test_fixed_length_when_not_adaptive():
    c = gpu_controller(adaptive=False)
    assert c.plan([1, 2, 3]) == {1: 4, 2: 4, 3: 4}
    assert c.worth_trying(10_000)


def test_small_batches_with_good_acceptance_speculate_fully():
    c = gpu_controller()
    train(c, [1], 4, 4)
    assert c.plan([1]) == {1: 4}


def test_large_batches_do_not_speculate():
    """Past the step's flat region every extra token costs; with the speculative step's fixed
    overhead no draft pays at 256 sequences even at 80% acceptance."""
    c = gpu_controller()
    seqs = list(range(256))
    train(c, seqs, 4, 3)
    assert c.plan(seqs) == {}
    assert not c.worth_trying(256)
    assert c.plan(seqs[:16])  # the same sequences in a small batch do


def test_poor_acceptance_turns_speculation_off_per_sequence():
    c = gpu_controller()
    train(c, [1], 4, 4)
    train(c, [2], 4, 0)
    plan = c.plan([1, 2])
    assert plan.get(1, 0) >= 3 and plan.get(2, 0) == 0


def test_measured_costs_override_the_prior():
    cost = StepCostModel(knee_tokens=128.0, spec_overhead=0.0, draft_step_cost=0.0)
    c = AdaptiveSpeculation(4, cost)
    train(c, [1], 4, 2)
    assert c.plan([1])
    for _ in range(10):  # speculative steps measured 3x as slow as plain ones (a CPU, say)
        cost.observe(False, 1, 0.010)
        for tokens in range(2, 6):
            cost.observe(True, tokens, 0.030)
    assert c.plan([1]) == {}


def test_speculative_steps_timed_without_a_plain_one_turn_off_until_a_plain_step_is_timed():
    """A run that speculates from its first step: once its speculative steps are timed, a plain
    step runs to be timed too, and from then on the measured ratio decides (eager verify steps on
    an H100 measured 3.2-3.8x a CUDA-graph decode step: no draft pays at 70% acceptance)."""
    cost = default_cost_model("cuda", None)
    c = AdaptiveSpeculation(4, cost)
    train(c, [1], 4, 2)  # about 70% per draft
    plan = c.plan([1])
    assert plan == {1: 4}  # the prior: verifying is nearly free on a GPU
    cost.observe(True, 1 + plan[1], 0.0210)
    assert c.plan([1]) == {}  # no plain step timed yet: run one
    cost.observe(False, 1, 0.0055)
    assert c.plan([1]) == {}  # every draft count costs at least 3.8x (k=1..3 are never cheaper)
    for _ in range(40):  # then verify graphs: 1.25x a decode step
        cost.observe(True, 1 + 4, 0.0069)
    assert c.plan([1]) == {1: 4}


def test_one_slow_first_speculative_step_does_not_keep_speculation_off():
    """A first verify step that paid for a warm-up turns speculation off; the steps that explore on
    the prior (every EXPLORE_EVERY-th) time it again, and cheap samples pull the estimate down fast."""
    from rtpllm.spec.adaptive import EXPLORE_EVERY
    cost = default_cost_model("cuda", None)
    c = AdaptiveSpeculation(4, cost)
    train(c, [1], 4, 2)
    cost.observe(True, 5, 0.100)  # warm-up: 18x a plain step
    cost.observe(False, 1, 0.0055)
    assert c.plan([1]) == {}
    explored = 0
    for _ in range(8):
        asked = [c.worth_trying(1) for _ in range(EXPLORE_EVERY)]
        assert asked[-1] and not any(asked[:-1])
        plan = c.plan([1])
        if plan:
            explored += 1
            cost.observe(True, 1 + plan[1], 0.0069)  # what a warm verify step costs
        if c.plan([1]) == {1: 4}:
            break
    assert explored >= 1 and c.plan([1]) == {1: 4}
    assert c.worth_trying(1)


def test_expected_tokens():
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def test_metrics_expose_the_counters_per_proposer():
    counters = SpecCounters(method="ngram", num_spec_steps=3, num_verified_seqs=4, num_draft_tokens=12,
                            num_accepted_tokens=6)
    stats = EngineStats(num_running=1, num_waiting=0, kv_blocks_used=1, kv_blocks_total=2, prefix_cache_queries=0,
                        prefix_cache_hits=0, num_preemptions=0, prompt_tokens_total=1, generation_tokens_total=2,
                        spec=counters)
    families = {f.name: f for f in _EngineStatsCollector(SimpleNamespace(stats=lambda: stats), "m").collect()}
    accepted = families["rtpllm:spec_decode_num_accepted_tokens"].samples[0]
    assert accepted.value == 6 and accepted.labels == {"model_name": "m", "method": "ngram"}
    assert families["rtpllm:spec_decode_mean_accepted_length"].samples[0].value == 2.5


def test_a_proposer_that_never_offers_stops_being_asked_but_is_retried():
    c = gpu_controller()
    for _ in range(40):
        c.record_offers(8, 0)
    asked = sum(c.worth_trying(8) for _ in range(64))
    assert 1 <= asked <= 3  # only the exploration steps
    c.record_offers(8, 8)
    for _ in range(20):
        c.record_offers(8, 8)
    assert c.worth_trying(8)
