"""The per-token SSE events of a stream, rendered without building pydantic models.

With 500 streaming clients, building a `CompletionResponse` / `ChatCompletionChunk` and dumping it
for every token was about 14% of the event loop's time, and the event loop competes with the
step thread for the GIL. A stream's id, creation time and model never change, so their JSON is
rendered once; each event then only encodes its text. The output equals the models'
`model_dump_json(exclude_none=True)` (tests/py/test_server_sse_chunks.py checks it). Events that
carry logprobs still go through the models.
"""

from __future__ import annotations

import json
from typing import Optional, Union

StopReason = Union[int, str, None]


def _json(value) -> bytes:
    # pydantic writes non-ASCII characters as UTF-8, not as \\u escapes; so does ensure_ascii=False.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _choice_end(finish_reason: Optional[str], stop_reason: StopReason) -> bytes:
    end = b""
    if finish_reason is not None:
        end += b',"finish_reason":' + _json(finish_reason)
    if stop_reason is not None:
        end += b',"stop_reason":' + _json(stop_reason)
    return end + b"}]}\n\n"


class _StreamChunks:
    object_name = b""

    def __init__(self, completion_id: str, created: int, model: str):
        self._prefix = (b'data: {"id":' + _json(completion_id) + b',"object":"' + self.object_name
                        + b'","created":' + str(created).encode() + b',"model":' + _json(model) + b',"choices":[')
        self._head = self._prefix + b'{"index":'

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The stream's last event: no choices, the token counts (`stream_options.include_usage`)."""
        return b"%s],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n" % (
            self._prefix, prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


class CompletionChunks(_StreamChunks):
    """`data: {CompletionResponse with one choice, no logprobs}` events of one stream."""

    object_name = b"text_completion"

    def event(self, index: int, text: str, finish_reason: Optional[str], stop_reason: StopReason) -> bytes:
        return b"".join((self._head, str(index).encode(), b',"text":', _json(text),
                         _choice_end(finish_reason, stop_reason)))


class ChatChunks(_StreamChunks):
    """`data: {ChatCompletionChunk with one choice, no logprobs}` events of one stream."""

    object_name = b"chat.completion.chunk"

    def event(self, index: int, role: Optional[str], content: str, finish_reason: Optional[str],
              stop_reason: StopReason) -> bytes:
        delta = b',"delta":{' + (b'"role":' + _json(role) + b',' if role is not None else b"")
        return b"".join((self._head, str(index).encode(), delta, b'"content":', _json(content), b"}",
                         _choice_end(finish_reason, stop_reason)))
