"""Bad input answers HTTP 400 with OpenAI's error body naming the field, and the server keeps serving."""

import httpx
import pytest

from checkpoints import checkpoint_path
from server_harness import RunningServer, build_async_engine, check_kv_pool_free

MAX_MODEL_LEN = 128
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    with RunningServer(build_async_engine(checkpoint_path("llama3"), max_model_len=MAX_MODEL_LEN)) as running:
        yield running


def _completion(**fields):
    return {"prompt": "hello", "max_tokens": 2, **fields}


# (endpoint, raw body, the param the error must name (None: no single field is to blame))
CASES = {
    "malformed json": ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', None),
    "not an object": ("/v1/completions", b'["hi"]', None),
    "invalid utf-8": ("/v1/completions", b'{"prompt": "caf\xc3\x28 \xff"}', None),
    "lone surrogate escape": ("/v1/completions", b'{"prompt": "\\ud800 x"}', None),
    "missing prompt": ("/v1/completions", {"max_tokens": 2}, "prompt"),
    "prompt of wrong type": ("/v1/completions", _completion(prompt=12), "prompt"),
    "max_tokens as a string": ("/v1/completions", _completion(max_tokens="5"), "max_tokens"),
    "stream as an int": ("/v1/completions", _completion(stream=1), "stream"),
    "temperature as a string": ("/v1/completions", _completion(temperature="hot"), "temperature"),
    "unknown model": ("/v1/completions", _completion(model="gpt-17"), "model"),
    "negative max_tokens": ("/v1/completions", _completion(max_tokens=-1), "max_tokens"),
    "zero max_tokens": ("/v1/completions", _completion(max_tokens=0), "max_tokens"),
    "huge max_tokens": ("/v1/completions", _completion(max_tokens=10**12), "max_tokens"),
    "prompt longer than the context": ("/v1/completions", _completion(prompt=[5] * MAX_MODEL_LEN), "prompt"),
    "token id outside the vocabulary": ("/v1/completions", _completion(prompt=[1, 2, 10**9]), "prompt"),
    "empty prompt": ("/v1/completions", _completion(prompt=""), "prompt"),
    "empty prompt list": ("/v1/completions", _completion(prompt=[]), "prompt"),
    "top_p above 1": ("/v1/completions", _completion(top_p=1.5), "top_p"),
    "top_p of 0": ("/v1/completions", _completion(top_p=0.0), "top_p"),
    "negative temperature": ("/v1/completions", _completion(temperature=-0.5), "temperature"),
    "n of 0": ("/v1/completions", _completion(n=0), "n"),
    "presence_penalty out of range": ("/v1/completions", _completion(presence_penalty=3.0), "presence_penalty"),
    "too many logprobs": ("/v1/completions", _completion(logprobs=50), "logprobs"),
    "stop of wrong type": ("/v1/completions", _completion(stop=[1, 2]), "stop"),
    "empty messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "message without a role": ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    "messages of wrong type": ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    "chat max_completion_tokens too large": (
        "/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": MAX_MODEL_LEN},
        "max_completion_tokens"),
    "top_logprobs without logprobs": ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2},
                                      "top_logprobs"),
    "tools": ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    "tokenize with neither prompt nor messages": ("/tokenize", {}, "prompt"),
    "detokenize outside the vocabulary": ("/detokenize", {"tokens": [-1]}, "tokens"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_400_naming_the_field(server, name):
    endpoint, body, param = CASES[name]
    if isinstance(body, bytes):
        response = httpx.post(server.url + endpoint, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(server.url + endpoint, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param is not None:
        assert error["message"].startswith(param.split(".")[0])


def test_streaming_request_with_bad_input_is_a_plain_400(server):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": MESSAGES, "stream": True, "max_tokens": -3})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


def test_unknown_route_and_wrong_method_use_the_error_body(server):
    missing = httpx.get(server.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong_method = httpx.get(server.url + "/v1/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_server_keeps_serving_after_bad_input(server):
    for endpoint, body, _ in CASES.values():
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        httpx.post(server.url + endpoint, **kwargs)
    response = httpx.post(server.url + "/v1/completions", json=_completion(max_tokens=3, ignore_eos=True))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.call_in_engine_thread(check_kv_pool_free)
