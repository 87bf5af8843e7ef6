"""`rtpllm router` in front of three CPU instances of a tiny model: cache-aware placement (checked
on the instances' own prefix-cache counters), load spreading, token-exact results, aborts on client
disconnect, and failover when an instance dies. The instances and the router start once."""

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from checkpoints import checkpoint_path
from router_harness import RunningApp, wait_until
from rtpllm.router.app import build_router_app
from rtpllm.router.config import RouterConfig
from server_harness import RunningServer, build_async_engine, check_kv_pool_free

MODEL = "llama3"
BLOCK = 16


@pytest.fixture(scope="module")
def instances():
    path = checkpoint_path(MODEL)
    servers = [RunningServer(build_async_engine(path, max_model_len=512, num_blocks=96)) for _ in range(3)]
    for s in servers:
        s.__enter__()
    yield servers
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture(scope="module")
def router(instances):
    config = RouterConfig(backends=tuple(s.url for s in instances), health_interval_s=0.2, load_interval_s=0.1,
                          health_timeout_s=1.0, connect_timeout_s=1.0, long_prompt_threshold=None)
    with RunningApp(build_router_app(config)) as running:
        wait_until(lambda: all(b["kv_cursor"] is not None for b in running.state()["backends"]),
                   what="the router's KV event subscriptions")
        yield running


@pytest.fixture(scope="module")
def client(router):
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


def hits(instances):
    return [s.metric("prefix_cache_hits_total") for s in instances]


def prompt_tokens(instances):
    return [s.metric("prompt_tokens_total") for s in instances]


def random_tokens(rng, n):
    return [rng.randrange(3, 500) for _ in range(n)]


def complete(router, prompt, max_tokens=4, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            **extra}
    response = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_requests_sharing_a_prefix_land_on_the_instance_that_holds_it(router, instances):
    rng = random.Random(1)
    for group in range(3):
        prefix = random_tokens(rng, 6 * BLOCK)
        complete(router, prefix + random_tokens(rng, 5))
        before = hits(instances)
        for _ in range(4):
            complete(router, prefix + random_tokens(rng, 7))
        gained = [after - b for after, b in zip(hits(instances), before)]
        holder = max(range(3), key=lambda i: gained[i])
        assert gained[holder] >= 4 * 6 * BLOCK, gained
        assert sum(gained) == gained[holder], f"group {group}: hits on other instances {gained}"


def test_chats_sharing_a_system_prompt_land_together(router, instances):
    rng = random.Random(4)
    words = ["alpha", "river", "stone", "cloud", "maple", "quartz", "ember", "lotus", "cedar", "delta"]
    system = " ".join(rng.choice(words) for _ in range(120))
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model=MODEL, max_tokens=2, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
    ask("first question")
    before = hits(instances)
    for question in ("what now", "and then", "why so"):
        ask(question)
    gained = [after - b for after, b in zip(hits(instances), before)]
    assert max(gained) >= 3 * 4 * BLOCK and sum(gained) == max(gained), gained


def test_load_spreads_when_prefixes_differ(router, instances):
    rng = random.Random(2)
    before = prompt_tokens(instances)
    prompts = [random_tokens(rng, 40) for _ in range(9)]
    with ThreadPoolExecutor(9) as pool:
        list(pool.map(lambda p: complete(router, p, max_tokens=8), prompts))
    gained = [a - b for a, b in zip(prompt_tokens(instances), before)]
    assert all(g > 0 for g in gained), gained


def test_results_are_token_exact_with_a_single_instance(client, instances):
    direct = openai.OpenAI(base_url=instances[0].url + "/v1", api_key="unused", max_retries=0)
    for prompt in ("The quick brown fox", "Once upon a time there was"):
        args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
        expected = direct.completions.create(**args)
        routed = client.completions.create(**args)
        assert routed.choices[0].text == expected.choices[0].text
        assert routed.usage == expected.usage
        streamed = client.completions.create(**args, stream=True, stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.choices[0].text
        assert chunks[-1].usage == expected.usage
    messages = [{"role": "user", "content": "Name a color."}]
    expected = direct.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.0)
    routed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.0)
    assert routed.choices[0].message.content == expected.choices[0].message.content
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_client_disconnect_aborts_the_request_on_the_instance(router, instances):
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    generated = sum(s.metric("generation_tokens_total") for s in instances)
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_raw())  # the first token arrived; now walk away
    wait_until(lambda: all(s.engine.stats().num_running == 0 for s in instances), what="the abort")
    assert all(s.call_in_engine_thread(check_kv_pool_free) for s in instances)
    assert sum(s.metric("generation_tokens_total") for s in instances) - generated < 200  # cut short, not finished
    wait_until(lambda: all(b["in_flight"] == 0 for b in router.state()["backends"]), what="the router's release")


def test_errors_from_the_instance_pass_through(router):
    response = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    response = httpx.post(router.url + "/v1/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    # The router's gate is serve's: bodies must be declared JSON.
    assert httpx.post(router.url + "/v1/completions", content=b"{}").status_code == 415


def test_router_metrics_count_routed_requests_and_expected_hits(router):
    text = httpx.get(router.url + "/metrics").text
    assert "rtpllm_router:requests_total" in text
    expected_hits = sum(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("rtpllm_router:expected_hit_tokens_total"))
    assert expected_hits >= 3 * 4 * 6 * BLOCK  # the shared-prefix test's hits were predicted


def test_a_killed_instance_is_routed_around(router, instances, client):
    victim = instances[2]
    victim.__exit__(None, None, None)  # the server stops listening: connections are refused
    rng = random.Random(3)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: complete(router, random_tokens(rng, 30)), range(6)))
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
    wait_until(lambda: not router.state()["backends"][2]["healthy"], what="the dead instance to leave the pool")
    assert httpx.get(router.url + "/health").status_code == 200  # two instances are still up
