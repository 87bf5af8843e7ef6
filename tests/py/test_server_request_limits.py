"""Requests that would hog or break the server are refused with a 400 naming the field (issue 15):
request chat templates (unless trusted, then bounded in time), prompts far over the context,
unbounded `n`, NaN and infinity, out-of-range integers; and tokenizing and templates run off the
event loop, and a queue limit counts only what really waits."""

import asyncio
import concurrent.futures
import threading
import time

import httpx
import pytest

from checkpoints import checkpoint_path
from rtpllm.serving import prompt_renderer
from rtpllm.serving.openai_server import ServerOptions
from server_harness import RunningServer, build_async_engine, check_kv_pool_free

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 16
NUM_BLOCKS = 64  # x 16 tokens: a KV cache of 1024 tokens
MESSAGES = [{"role": "user", "content": "hi"}]
SLOW_TEMPLATE = "{% for i in range(8000) %}{% for j in range(8000) %}{% set k = j %}{% endfor %}{% endfor %}Hi"


@pytest.fixture(scope="module")
def server():
    engine = build_async_engine(checkpoint_path("llama3"), max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                                num_blocks=NUM_BLOCKS, max_queued_requests=2)
    with RunningServer(engine) as running:
        yield running


@pytest.fixture(scope="module")
def trusting_server():
    engine = build_async_engine(checkpoint_path("llama3"), max_model_len=MAX_MODEL_LEN)
    with RunningServer(engine, ServerOptions(trust_request_chat_template=True, enable_docs=True)) as running:
        yield running


def _error(response: httpx.Response, param: str, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    return error


def _max_health_latency_while(server, work) -> tuple[float, object, float]:
    """Runs `work()` in a thread and polls /health meanwhile: the slowest health answer, work's result
    and how long it took. (With the event loop blocked, the slowest answer would take about as
    long as the work; the tests compare the two, so that a loaded machine does not fail them.)"""
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        latencies = []
        with httpx.Client() as client:
            while not future.done():
                start = time.monotonic()
                assert client.get(server.url + "/health").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.01)
        return max(latencies, default=0.0), future.result(), time.monotonic() - began


@pytest.mark.parametrize("where", ["chat_template_kwargs", "top level"])
def test_request_chat_templates_are_refused_unless_trusted(server, where):
    body = {"messages": MESSAGES, "max_tokens": 2}
    if where == "top level":
        body["chat_template"] = SLOW_TEMPLATE
        param = "chat_template"
    else:
        body["chat_template_kwargs"] = {"chat_template": SLOW_TEMPLATE}
        param = "chat_template_kwargs.chat_template"
    start = time.monotonic()
    error = _error(httpx.post(server.url + "/v1/chat/completions", json=body), param)
    assert "--trust-request-chat-template" in error["message"]
    assert time.monotonic() - start < 1.0
    reserved = {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}
    _error(httpx.post(server.url + "/v1/chat/completions", json=reserved), "chat_template_kwargs.tokenize")


def test_trusted_request_templates_render_off_the_loop_within_a_deadline(trusting_server, monkeypatch):
    server = trusting_server
    body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2, "ignore_eos": True,
            "chat_template": "{% for m in messages %}<{{ m.content }}>{% endfor %}"}
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(server.engine.tokenizer.encode(
        "<abc>", add_special_tokens=False))
    monkeypatch.setattr(prompt_renderer, "REQUEST_TEMPLATE_TIMEOUT_S", 1.0)
    slow = {**body, "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}}
    del slow["chat_template"]
    worst, response, elapsed = _max_health_latency_while(
        server, lambda: httpx.post(server.url + "/v1/chat/completions", json=slow, timeout=30))
    assert elapsed < 5.0
    error = _error(response, "chat_template_kwargs.chat_template")
    assert "longer than 1s" in error["message"]
    assert worst < elapsed / 3, f"/health took {worst:.2f}s while the template ran for {elapsed:.2f}s"


def test_docs_can_be_turned_on(trusting_server):
    assert httpx.get(trusting_server.url + "/openapi.json").status_code == 200


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing_it_all(server):
    huge = "hello world " * 400_000  # 4.8 MB, about 800k tokens
    start = time.monotonic()
    error = _error(httpx.post(server.url + "/v1/completions", json={"prompt": huge, "max_tokens": 1}, timeout=30),
                   "prompt")
    assert error["code"] == "context_length_exceeded"
    assert time.monotonic() - start < 2.0
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": huge}], "max_tokens": 1})
    assert _error(chat, "messages")["code"] == "context_length_exceeded"
    ids = httpx.post(server.url + "/v1/completions", json={"prompt": [1] * 500_000, "max_tokens": 1}, timeout=30)
    assert _error(ids, "prompt")["code"] == "context_length_exceeded"


def test_tokenize_runs_off_the_event_loop(server):
    text = "hello world, this is a test. " * 40_000  # 1.2 MB: about a second of tokenizing
    worst, response, elapsed = _max_health_latency_while(
        server, lambda: httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=60))
    assert response.status_code == 200 and response.json()["count"] > 100_000
    assert worst < elapsed / 3, f"/health took {worst:.2f}s while tokenizing for {elapsed:.2f}s"


def test_huge_prompts_never_queue_ahead_of_ordinary_ones():
    class SlowTokenizer:
        """Takes a second per 100k characters, without holding the GIL (as the real one mostly does)."""
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            time.sleep(len(text) / 100_000)
            return [1] * 10

    async def main():
        renderer = prompt_renderer.PromptRenderer(SlowTokenizer(), max_model_len=10**9)
        try:
            huge = [asyncio.ensure_future(renderer.encode("x" * 150_000)) for _ in range(3)]
            await asyncio.sleep(0.05)
            start = time.monotonic()
            await renderer.encode("y" * 1000)  # 10 ms of work
            ordinary_s = time.monotonic() - start
            assert not any(task.done() for task in huge)
            await asyncio.gather(*huge)
            return ordinary_s
        finally:
            renderer.close()

    assert asyncio.run(main()) < 0.5


def test_n_is_bounded_by_the_batch_and_the_kv_cache(server):
    start = time.monotonic()
    error = _error(httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "n": 20000, "max_tokens": 1}),
                   "n")
    assert str(MAX_NUM_SEQS) in error["message"] and time.monotonic() - start < 1.0
    # 16 sequences of 100 tokens: more than the 1024-token KV cache.
    error = _error(httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "n": 16, "max_tokens": 100}),
                   "max_tokens")
    assert "1024" in error["message"]
    _error(httpx.post(server.url + "/v1/chat/completions",
                      json={"messages": MESSAGES, "n": 16, "max_completion_tokens": 100}), "max_completion_tokens")
    batch = {"prompt": ["a", "b", "c", "d", "e"], "n": 4, "max_tokens": 1}
    _error(httpx.post(server.url + "/v1/completions", json=batch), "prompt")
    start = time.monotonic()  # 200k short prompts: refused by their count, none of them tokenized
    _error(httpx.post(server.url + "/v1/completions", json={"prompt": ["hi"] * 200_000, "max_tokens": 1}), "prompt")
    assert time.monotonic() - start < 1.5
    fits = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "n": 16, "max_tokens": 8})
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 16


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(server, field, literal):
    body = f'{{"prompt": "hi", "max_tokens": 2, "{field}": {literal}}}'.encode()
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    _error(response, field)


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("seed", -2**63 - 1), ("top_k", 2**70), ("top_k", -2),
                                          ("stop", ["x"] * 65), ("stop", "x" * 1025), ("stop_token_ids", [1] * 1025)])
def test_out_of_range_integers_name_their_field_and_range(server, field, value):
    error = _error(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value}),
                   field)
    assert "must be" in error["message"] or "at most" in error["message"]


@pytest.mark.parametrize("seed", [0, 2**63 - 1, -2**63])
def test_seeds_at_the_ends_of_the_range_work(server, seed):
    body = {"prompt": "hi", "max_tokens": 2, "seed": seed, "n": 2, "temperature": 1.0}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200


def test_queue_limit_counts_only_requests_that_wait(server):
    # An idle server with 16 batch slots and max_queued_requests=2: 12 requests at once all fit.
    barrier = threading.Barrier(12)

    def send(_):
        barrier.wait()
        return httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True}).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(send, range(12)))
    assert statuses == [200] * 12
    assert server.call_in_engine_thread(check_kv_pool_free)


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/chat/completions", b'{"messages": [' + b",".join([b'{"role":"user"}'] * 900_000) + b"]}"),
    ("/v1/completions", b'{"prompt": [' + b",".join([b"[1]"] * 3_000_000) + b"]}"),
    ("/detokenize", b'{"tokens": [' + b",".join([b'"a"'] * 3_000_000) + b"]}"),
    ("/v1/completions", b'{"prompt": "a", "stop_token_ids": [' + b",".join([b'"a"'] * 3_000_000) + b"]}"),
], ids=["900k messages", "3M one-token prompts", "3M bad token ids", "3M bad stop ids"])
def test_bodies_that_take_long_to_validate_are_refused_quickly(server, endpoint, body):
    # Validated in full, each of these took 5 to 30 s of the event loop.
    start = time.monotonic()
    response = httpx.post(server.url + endpoint, content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert time.monotonic() - start < 2.0
