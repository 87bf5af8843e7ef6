"""The hand-rendered stream events equal what the pydantic models would have written."""

import pytest

from rtpllm.serving.protocol import (ChatCompletionChunk, ChatDelta, ChatStreamChoice, CompletionChoice,
                                     CompletionResponse, UsageInfo)
from rtpllm.serving.sse_chunks import ChatChunks, CompletionChunks
from rtpllm.serving.streaming import sse_event

TEXTS = ["", "Hello", ' "quoted" \\ back/slash', "line\nbreak\ttab\r\x00\x1f\x7f", "héllo 世界 🙂", "\u2028\u2029"]
ENDS = [(None, None), ("stop", None), ("length", None), ("stop", 13), ("stop", "###"), ("abort", None)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish_reason,stop_reason", ENDS)
def test_completion_event_equals_model(text, finish_reason, stop_reason):
    chunks = CompletionChunks('cmpl-"x"', 1790000000, "tiny/模型")
    expected = sse_event(CompletionResponse(
        id='cmpl-"x"', created=1790000000, model="tiny/模型",
        choices=[CompletionChoice(index=7, text=text, finish_reason=finish_reason, stop_reason=stop_reason)]))
    assert chunks.event(7, text, finish_reason, stop_reason) == expected


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("role", [None, "assistant"])
@pytest.mark.parametrize("finish_reason,stop_reason", ENDS)
def test_chat_event_equals_model(text, role, finish_reason, stop_reason):
    chunks = ChatChunks("chatcmpl-1", 5, "m")
    expected = sse_event(ChatCompletionChunk(
        id="chatcmpl-1", created=5, model="m",
        choices=[ChatStreamChoice(index=0, delta=ChatDelta(role=role, content=text), finish_reason=finish_reason,
                                  stop_reason=stop_reason)]))
    assert chunks.event(0, role, text, finish_reason, stop_reason) == expected


@pytest.mark.parametrize("prompt_tokens,completion_tokens", [(0, 0), (1, 1), (37, 1024)])
def test_usage_event_equals_model(prompt_tokens, completion_tokens):
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    completion = sse_event(CompletionResponse(id="cmpl-1", created=3, model="m", choices=[], usage=usage))
    assert CompletionChunks("cmpl-1", 3, "m").usage_event(prompt_tokens, completion_tokens) == completion
    chat = sse_event(ChatCompletionChunk(id="c", created=3, model="m", choices=[], usage=usage))
    assert ChatChunks("c", 3, "m").usage_event(prompt_tokens, completion_tokens) == chat
