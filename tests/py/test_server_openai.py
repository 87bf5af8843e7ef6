"""The OpenAI-compatible server through the official `openai` client: completions and chat,
streaming and not, against the offline `LLM` on the same checkpoint (greedy, so they must agree)."""

import json

import httpx
import openai
import pytest

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from server_harness import RunningServer, build_async_engine

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def model_path():
    return checkpoint_path("llama3")


@pytest.fixture(scope="module")
def server(model_path):
    with RunningServer(build_async_engine(model_path, max_model_len=256)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, num_blocks=64, max_model_len=256)


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["llama3"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_greedy_completion_matches_offline_llm(client, offline):
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    response = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=12, temperature=0.0,
                                         extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_streamed_completion_concatenates_to_the_full_text(client):
    full = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=10, temperature=0.0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="llama3", prompt=PROMPT, max_tokens=10, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and not chunks[-1].choices
    assert usage_chunks[0].usage.completion_tokens == 10


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0.0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_chat_matches_offline_llm_streamed_and_not(client, offline):
    expected = offline.chat(MESSAGES, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    response = client.chat.completions.create(model="llama3", messages=MESSAGES, max_completion_tokens=8,
                                              temperature=0.0, extra_body={"ignore_eos": True})
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(model="llama3", messages=MESSAGES, max_tokens=8, temperature=0.0,
                                            stream=True, extra_body={"ignore_eos": True})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected.outputs[0].text


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client):
    def run():
        response = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=8, n=3, seed=7,
                                             temperature=1.0, extra_body={"ignore_eos": True})
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first = run()
    assert len(first) == 3 and len(set(first)) > 1
    assert run() == first


def test_streamed_n_choices_each_finish_once(client):
    stream = client.chat.completions.create(model="llama3", messages=MESSAGES, max_tokens=5, n=2, seed=1,
                                            stream=True, extra_body={"ignore_eos": True})
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in stream
                if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]


def test_stop_string_ends_the_choice(client, offline):
    free = offline.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    text = free.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), "the greedy text should have a printable middle"
    response = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=16, temperature=0.0,
                                         stop=[stop], extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[:text.index(stop)]


def test_completion_logprobs_list_the_sampled_token_and_alternatives(client):
    response = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=5, temperature=0.0,
                                         logprobs=3, extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and value <= 0.0
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy picks the most likely token


def test_chat_top_logprobs(client):
    response = client.chat.completions.create(model="llama3", messages=MESSAGES, max_tokens=4, temperature=0.0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


def test_batched_prompts_give_one_choice_per_prompt_and_sample(client):
    response = client.completions.create(model="llama3", prompt=[PROMPT, "Hello"], max_tokens=3, n=2,
                                         temperature=0.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in response.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: samples of a prompt agree


def test_token_id_prompt_equals_its_text(client, server):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model="llama3", prompt=PROMPT, max_tokens=6, temperature=0.0)
    by_ids = client.completions.create(model="llama3", prompt=tokens, max_tokens=6, temperature=0.0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_tokenize_and_detokenize_round_trip(server, offline):
    tokenizer = offline.get_tokenizer()
    tokenized = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert tokenized["tokens"] == tokenizer.encode(PROMPT)
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 256
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    assert PROMPT in text
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == offline.chat(MESSAGES, SamplingParams(max_tokens=1))[0].prompt_token_ids


def test_metrics_count_requests_tokens_and_latencies(client, server):
    before_success = server.metric("request_success_total")
    before_generated = server.metric("generation_tokens_total")
    client.completions.create(model="llama3", prompt=PROMPT, max_tokens=7, temperature=0.0,
                              extra_body={"ignore_eos": True})
    assert server.metric("request_success_total") == before_success + 1
    assert server.metric("generation_tokens_total") == before_generated + 7
    assert server.metric("time_to_first_token_seconds_count") >= 1
    assert server.metric("inter_token_latency_seconds_count") >= 6
    assert server.metric("e2e_request_latency_seconds_count") >= 1
    assert server.metric("request_queue_time_seconds_count") >= 1
    assert server.metric("kv_cache_blocks_total") == 128
    assert server.metric("prompt_tokens_total") > 0
    assert server.metric("prefix_cache_queries_total") >= server.metric("prefix_cache_hits_total")
    assert server.metric("num_requests_running") == 0
