"""Serving-benchmark metrics follow `vllm bench serve`'s definitions, checked on hand-made timings."""

import pytest

from rtpllm.benchmarks.report import format_serve_table
from rtpllm.benchmarks.request_client import RequestResult
from rtpllm.benchmarks.serve_metrics import calculate_metrics, output_token_counts, parse_goodput


def _result(prompt_len, ttft, itl, success=True, text="", output_tokens=None, start=0.0):
    times = [start + ttft]
    for gap in itl:
        times.append(times[-1] + gap)
    return RequestResult(prompt_len=prompt_len, success=success, generated_text=text, output_tokens=output_tokens,
                         ttft=ttft, itl=list(itl), latency=times[-1] - start, start_time=start, chunk_times=times)


def test_throughputs_and_latencies_match_the_definitions():
    results = [
        _result(10, ttft=0.100, itl=[0.010, 0.030]),  # 3 tokens: latency 0.14, TPOT 0.02
        _result(20, ttft=0.200, itl=[0.020]),  # 2 tokens: latency 0.22, TPOT 0.02
        _result(30, ttft=0.300, itl=[]),  # 1 token: no TPOT
        _result(40, ttft=0.0, itl=[], success=False),
    ]
    metrics = calculate_metrics(results, [3, 2, 1, 0], duration_s=2.0, percentiles=[50, 99])
    assert metrics.completed == 3 and metrics.failed == 1
    assert metrics.total_input_tokens == 60 and metrics.total_output_tokens == 6
    assert metrics.request_throughput == pytest.approx(1.5)
    assert metrics.output_throughput == pytest.approx(3.0)
    assert metrics.total_token_throughput == pytest.approx(33.0)
    assert metrics.ttft_ms.mean == pytest.approx(200.0) and metrics.ttft_ms.median == pytest.approx(200.0)
    assert metrics.tpot_ms.mean == pytest.approx(20.0)  # mean over the two multi-token requests
    assert metrics.itl_ms.mean == pytest.approx(20.0)  # pooled gaps 10, 30, 20
    assert metrics.itl_ms.percentiles["p50"] == pytest.approx(20.0)
    assert metrics.e2el_ms.mean == pytest.approx((140.0 + 220.0 + 300.0) / 3)
    assert metrics.ttft_ms.percentiles["p99"] == pytest.approx(298.0)  # numpy's linear interpolation
    assert metrics.request_goodput is None


def test_goodput_counts_requests_meeting_every_slo():
    results = [_result(5, ttft=0.05, itl=[0.01] * 4), _result(5, ttft=0.5, itl=[0.01] * 4),
               _result(5, ttft=0.05, itl=[0.2] * 4)]
    slos = parse_goodput(["ttft:100", "tpot:50"])
    assert slos == {"ttft": 0.1, "tpot": 0.05}
    metrics = calculate_metrics(results, [5, 5, 5], duration_s=1.0, percentiles=[99], goodput_slos=slos)
    assert metrics.request_goodput == pytest.approx(1.0)  # only the first meets both
    e2el_only = calculate_metrics(results, [5, 5, 5], 1.0, [99], parse_goodput(["e2el:200"]))
    assert e2el_only.request_goodput == pytest.approx(1.0)  # 90 ms passes; 540 ms and 850 ms do not


@pytest.mark.parametrize("spec", ["ttft", "latency:5", "ttft:fast", "tpot:-1"])
def test_bad_goodput_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([spec])


def test_output_tokens_come_from_usage_else_from_the_text():
    class WordTokenizer:
        def encode(self, text, add_special_tokens=False):
            return text.split()

    results = [_result(1, 0.1, [], output_tokens=9, text="a b"), _result(1, 0.1, [], text="one two three"),
               _result(1, 0.1, [], success=False, text="x y")]
    assert output_token_counts(results, WordTokenizer()) == [9, 3, 0]


def test_peak_rate_and_table():
    # Chunks every 1/8 s (exact in binary): 8 of the first request and 4 of the second in second 0.
    results = [_result(1, ttft=0.125, itl=[0.125] * 7, start=0.0),
               _result(1, ttft=0.125, itl=[0.125] * 7, start=0.5)]
    metrics = calculate_metrics(results, [8, 8], duration_s=1.5, percentiles=[90, 99])
    assert metrics.max_output_tokens_per_s == pytest.approx(12.0)
    table = format_serve_table(metrics, {"Dataset": "random"})
    for label in ("Successful requests:", "Mean TTFT (ms):", "P90 TPOT (ms):", "P99 ITL (ms):",
                  "Median E2EL (ms):", "Dataset:"):
        assert label in table
