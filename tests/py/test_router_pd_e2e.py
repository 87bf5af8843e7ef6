"""`rtpllm router --prefill --decode` in front of real instances: a prefill and a decode `rtpllm
serve` process of the tiny model (block sizes 16 and 8, KV over UCX's TCP transport), token-exact
against one colocated instance through the OpenAI client, streamed and not; and a prefill instance
killed mid-transfer: the client gets a clear error at once, the decode instance frees the
reservation, and the next request succeeds; with --pd-retry, a request that meets the dead
instance is written by the other one into the same reservation. Logprobs and n > 1 through the
router match the colocated instance."""

import threading
import time

import httpx
import openai
import pytest

from pd_driver import Instance
from router_harness import RunningApp, wait_until
from rtpllm.router.app import build_router_app
from rtpllm.router.config import RouterConfig

pytestmark = pytest.mark.skipif(not __import__("rtpllm._C")._C.has_ucx, reason="rtpllm._C built without UCX")

STALL_S = 1.0  # the doomed prefill instance pauses between layers, so that the kill lands mid-transfer
PD_TIMEOUT_S = 3.0
PROMPT = "The quick brown fox jumps over the lazy dog, and then the"
CHAT = [{"role": "user", "content": "Tell me about foxes and dogs."}]


@pytest.fixture(scope="module")
def instances():
    # Decode holds a failed reservation's blocks for 3 x pd_timeout_s at most (a late write must not
    # land in reused blocks): a short bound keeps the test short.
    common = ("--kv-host-cache-gib", "0", "--pd-timeout-s", str(PD_TIMEOUT_S))
    started = {"colocated": Instance("--block-size", "16", "--no-engine-process", "--kv-host-cache-gib", "0"),
               "prefill": Instance("--role", "prefill", "--block-size", "16", *common),
               "doomed": Instance("--role", "prefill", "--block-size", "16", *common,
                                  env={"RTPLLM_PD_TEST_STALL_S": str(STALL_S)}),
               "decode": Instance("--role", "decode", "--block-size", "8", *common)}
    try:
        for instance in started.values():
            instance.wait_ready()
        yield started
    finally:
        for instance in started.values():
            instance.stop()


def router_config(prefill, decode, **overrides) -> RouterConfig:
    options = {"health_interval_s": 0.5, "pd_prefill_timeout_s": 30, **overrides}
    return RouterConfig(prefill=tuple(i.url for i in prefill), decode=tuple(i.url for i in decode), **options)


@pytest.fixture(scope="module")
def router(instances):
    with RunningApp(build_router_app(router_config([instances["prefill"]], [instances["decode"]]))) as running:
        yield running


def _text(client, kind: str, stream: bool) -> str:
    if kind == "completions":
        reply = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=12, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text
    reply = client.chat.completions.create(model="llama3", messages=CHAT, max_tokens=12, temperature=0, stream=stream)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    return reply.choices[0].message.content


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_pd_router_is_token_exact_against_a_colocated_instance(instances, router, kind, stream):
    colocated = openai.OpenAI(base_url=instances["colocated"].url + "/v1", api_key="unused", max_retries=0)
    pd = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    expected = _text(colocated, kind, stream=False)
    assert expected and _text(pd, kind, stream) == expected


def test_usage_and_the_routers_metrics(instances, router):
    body = {"model": "llama3", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    expected = httpx.post(instances["colocated"].url + "/v1/completions", json=body, timeout=60).json()
    reply = httpx.post(router.url + "/v1/completions", json=body, timeout=60).json()
    assert reply["usage"] == expected["usage"]
    metrics = httpx.get(router.url + "/metrics").text
    assert 'rtpllm_router:pd_requests_total{outcome="ok"}' in metrics
    assert instances["prefill"].metric("rtpllm:pd_requests_total", role="prefill", outcome="completed") >= 1


def test_a_killed_prefill_instance_is_an_error_or_with_pd_retry_a_retry(instances, router):
    doomed, decode = instances["doomed"], instances["decode"]
    # Health checks far apart: these routers learn of the death from their requests.
    config = router_config([doomed], [decode], health_interval_s=30)
    retrying_config = router_config([doomed, instances["prefill"]], [decode], health_interval_s=30,
                                    policy="round_robin", pd_retry=True)  # round robin: the doomed one first
    with RunningApp(build_router_app(config)) as lone, RunningApp(build_router_app(retrying_config)) as retrying:
        result = {}

        def request():
            result["response"] = httpx.post(lone.url + "/v1/completions", timeout=60,
                                            json={"model": "llama3", "prompt": PROMPT * 4, "max_tokens": 4})

        thread = threading.Thread(target=request)
        thread.start()
        wait_until(lambda: decode.metric("rtpllm:kv_cache_usage_perc") > 0, timeout_s=30, what="the reservation")
        time.sleep(STALL_S / 2)  # the first layer's writes are under way
        killed_at = time.monotonic()
        doomed.kill()
        thread.join(60)
        assert time.monotonic() - killed_at < 10
        response = result["response"]
        # Whichever side reports first (the router's broken prefill connection, or decode's error
        # event for its failed peer), the client gets a 503 naming the prefill.
        assert response.status_code == 503, response.text
        assert "prefill" in response.json()["error"]["message"]
        outcomes = [line for line in httpx.get(lone.url + "/metrics").text.splitlines()
                    if line.startswith("rtpllm_router:pd_requests_total{")]
        assert len(outcomes) == 1 and ('"prefill_failed"' in outcomes[0] or '"decode_error"' in outcomes[0])
        # With --pd-retry, a prefill instance that refuses the connection (nothing written yet) is
        # replaced by the other one, writing into the same reservation: the client sees no failure.
        body = {"model": "llama3", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        expected = httpx.post(instances["colocated"].url + "/v1/completions", json=body, timeout=60).json()
        reply = httpx.post(retrying.url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected["choices"][0]["text"]
        assert 'rtpllm_router:retries_total{reason="pd_prefill_connection"} 1.0' in httpx.get(
            retrying.url + "/metrics").text
    wait_until(lambda: decode.metric("rtpllm:kv_cache_usage_perc") == 0, timeout_s=3 * PD_TIMEOUT_S + 10,
               what="the decode instance to free the reservation")
    # The decode instance serves on, with the prefill instance that is alive.
    body = {"model": "llama3", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    expected = httpx.post(instances["colocated"].url + "/v1/completions", json=body, timeout=60).json()
    reply = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected["choices"][0]["text"]


def _logprob_rows(kind: str, stream: bool, reply) -> list[tuple[str, float, dict]]:
    """(token, logprob, {top token: logprob}) per generated position, from either endpoint's reply."""
    rows = []
    for part in (reply if stream else [reply]):
        for choice in part.choices:
            logprobs = choice.logprobs
            if logprobs is None:
                continue
            if kind == "chat":
                rows += [(e.token, e.logprob, {t.token: t.logprob for t in e.top_logprobs}) for e in logprobs.content]
            else:
                rows += list(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs))
    return rows


def _with_logprobs(client, kind: str, stream: bool, **sampling):
    if kind == "completions":
        return client.completions.create(model="llama3", prompt=PROMPT, max_tokens=8, logprobs=3, stream=stream,
                                         **sampling)
    return client.chat.completions.create(model="llama3", messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3,
                                          stream=stream, **sampling)


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_through_the_pd_router_match_a_colocated_instance(instances, router, kind, stream):
    colocated = openai.OpenAI(base_url=instances["colocated"].url + "/v1", api_key="unused", max_retries=0)
    pd = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    sampling = {"temperature": 0} if stream else {"temperature": 0.8, "seed": 7}
    expected = _logprob_rows(kind, False, _with_logprobs(colocated, kind, False, **sampling))
    got = _logprob_rows(kind, stream, _with_logprobs(pd, kind, stream, **sampling))
    assert len(expected) == 8 and [r[0] for r in got] == [r[0] for r in expected]
    # The first position's logprobs were computed on the prefill instance and carried to decode.
    for (_, want, want_top), (_, have, have_top) in zip(expected, got):
        assert have == pytest.approx(want, abs=1e-4)
        assert want_top and have_top == pytest.approx(want_top, abs=1e-4)  # keyed by text: may be < 3


def _choices(kind: str, stream: bool, reply) -> dict[int, str]:
    """index -> text of each of the n choices, from either endpoint's reply."""
    texts: dict[int, str] = {}
    for part in (reply if stream else [reply]):
        for choice in part.choices:
            if kind == "completions":
                piece = choice.text
            else:
                piece = (choice.delta.content if stream else choice.message.content) or ""
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


@pytest.mark.parametrize("kind,stream,sampling", [
    ("completions", False, {"temperature": 0.9, "seed": 99, "n": 3}),
    ("chat", True, {"temperature": 0.9, "seed": 5, "n": 2}),
    ("completions", True, {"temperature": 0, "n": 2}),
])
def test_n_samples_through_the_pd_router_match_a_colocated_instance(instances, router, kind, stream, sampling):
    colocated = openai.OpenAI(base_url=instances["colocated"].url + "/v1", api_key="unused", max_retries=0)
    pd = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    prefill = instances["prefill"]
    decode = instances["decode"]
    prefills_before = prefill.metric("rtpllm:pd_requests_total", role="prefill", outcome="completed")
    hits_before = decode.metric("rtpllm:prefix_cache_hits_total")

    def ask(client, stream):
        if kind == "completions":
            return client.completions.create(model="llama3", prompt=PROMPT, max_tokens=6, stream=stream, **sampling)
        return client.chat.completions.create(model="llama3", messages=CHAT, max_tokens=6, stream=stream, **sampling)

    expected = _choices(kind, False, ask(colocated, False))
    got = _choices(kind, stream, ask(pd, stream))
    assert sorted(expected) == list(range(sampling["n"])) and got == expected
    if sampling["temperature"] > 0:
        assert len(set(expected.values())) > 1  # the samples differ: each has its own seeded stream
    # The prefill instance computed the prompt once (one sample), not n times.
    assert prefill.metric("rtpllm:pd_requests_total", role="prefill", outcome="completed") - prefills_before == 1
    # Decode started the other samples on the transferred prompt's full blocks (prefix hits).
    assert decode.metric("rtpllm:prefix_cache_hits_total") - hits_before >= (sampling["n"] - 1) * 8

