"""The OpenAI wire format: request bodies (validated strictly) and response bodies.

Requests use strict types so that `"max_tokens": "5"` or `"stream": 1` is a 400 naming the field
rather than a silent coercion, and refuse NaN and infinity in every float field (JSON has no such
numbers, but Python's and pydantic's parsers accept `NaN` and `Infinity` literals). Parsing runs
on the event loop, so its cost is bounded: lists stop at their first bad item (a million bad items
would make a million error objects, seconds of work), and a body may hold at most
`MAX_JSON_CONTAINERS` arrays and objects (a million messages would take seconds to validate),
which `check_json_containers` checks on the raw bytes first. Unknown fields are ignored, as OpenAI-compatible servers do, so
clients that send newer fields keep working. Fields past OpenAI's own (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, ...) follow vLLM's names.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# About 0.1 s of validation at worst (16k chat messages); real requests hold a few dozen of each.
MAX_JSON_CONTAINERS = 16384
MAX_JSON_STRINGS = 65536


def check_json_containers(raw: bytes, max_containers: int = MAX_JSON_CONTAINERS,
                          max_strings: int = MAX_JSON_STRINGS) -> None:
    """Raises ValueError when the JSON text `raw` holds more than `max_containers` arrays and
    objects (brackets inside strings do not count). Bytes operations and at most `max_strings`
    steps: tens of milliseconds for 16 MB, whatever the body."""
    if raw.count(b"[") + raw.count(b"{") <= max_containers:
        return  # the common case: fewer brackets than the limit, even counting those in strings
    # Drop escaped backslashes, then escaped quotes: every `"` left delimits a string (in valid JSON).
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    containers = strings = position = 0
    while True:
        opening = text.find(b'"', position)
        end = len(text) if opening < 0 else opening
        containers += text.count(b"[", position, end) + text.count(b"{", position, end)
        if containers > max_containers:
            raise ValueError(f"request body: more than {max_containers} JSON arrays and objects")
        if opening < 0:
            return
        strings += 1
        if strings > max_strings:
            raise ValueError(f"request body: more than {max_containers} JSON arrays and objects, or "
                             f"{max_strings} strings, with brackets inside strings")
        closing = text.find(b'"', opening + 1)
        if closing < 0:
            return  # an unterminated string: the parser refuses it
        position = closing + 1


IntList = Annotated[list[int], Field(fail_fast=True)]
StrList = Annotated[list[str], Field(fail_fast=True)]
Prompt = Union[str, StrList, IntList, Annotated[list[IntList], Field(fail_fast=True)]]


class StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(StrictRequest):
    include_usage: bool = False


class SamplingRequest(StrictRequest):
    """The fields completions and chat completions share."""

    model: Optional[str] = None  # None: the served model
    n: int = 1
    max_tokens: Optional[int] = None  # None: up to the context length
    min_tokens: int = 0
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, StrList]] = None
    stop_token_ids: Optional[IntList] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    # One prompt or a batch, each as text or token ids.
    prompt: Prompt
    logprobs: Optional[int] = None  # the number of top alternatives per position
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class TextContentPart(StrictRequest):
    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, Annotated[list[TextContentPart], Field(fail_fast=True)]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Messages = Annotated[list[ChatMessage], Field(fail_fast=True)]


class ChatCompletionRequest(SamplingRequest):
    messages: Messages
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # A template of the request's own (vLLM's field; also accepted inside chat_template_kwargs): a 400
    # unless the server runs with --trust-request-chat-template.
    chat_template: Optional[str] = None
    # Accepted only in their "off" form; anything else is a 400 rather than silently ignored.
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None


class TokenizeRequest(StrictRequest):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[Messages] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictRequest):
    model: Optional[str] = None
    tokens: IntList


# ---------------------------------------------------------------------------- responses
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[UsageInfo] = None


class ChatDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "rtpllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: IntList


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
