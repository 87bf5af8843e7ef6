"""One streaming request to an OpenAI-compatible server, timed the way `vllm bench serve` times it.

- TTFT: from sending the request to the first streamed chunk that carries a choice.
- ITL: the gaps between consecutive chunks that carry a choice (a chunk may hold several tokens
  when the server coalesces, so ITL is per chunk, as in vLLM).
- Latency (end-to-end): from sending the request to the last chunk.
Output tokens come from the server's `usage` (requested with `stream_options.include_usage`);
the caller tokenizes the text when a server sends no usage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import aiohttp

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


@dataclass
class RequestInput:
    api_url: str  # base URL + endpoint
    model: str
    prompt: Union[str, list[dict[str, str]]]  # text for completions, messages for chat
    prompt_len: int
    output_len: int
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.api_url.endswith(CHAT_COMPLETIONS)


@dataclass
class RequestResult:
    prompt_len: int = 0
    success: bool = False
    generated_text: str = ""
    output_tokens: Optional[int] = None  # from usage; None when the server sent none
    usage_prompt_tokens: Optional[int] = None
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # perf_counter() of each chunk with a choice
    error: str = ""


def _payload(request: RequestInput) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.is_chat:
        payload["messages"] = request.prompt
    else:
        payload["prompt"] = request.prompt
    if request.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(request.extra_body)
    return payload


def _choice_text(choice: dict[str, Any], is_chat: bool) -> str:
    if is_chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _consume_event(event: bytes, now: float, result: RequestResult, text_parts: list[str], is_chat: bool) -> bool:
    """Records one SSE event received at `now`; True once the stream is over ([DONE] or an error)."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue  # SSE comments and other fields
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = json.dumps(chunk["error"])[:500]
            return True
        if chunk.get("choices"):
            if result.chunk_times:
                result.itl.append(now - result.chunk_times[-1])
            else:
                result.ttft = now - result.start_time
            result.chunk_times.append(now)
            text_parts.append(_choice_text(chunk["choices"][0], is_chat))
        if chunk.get("usage"):
            result.output_tokens = chunk["usage"].get("completion_tokens")
            result.usage_prompt_tokens = chunk["usage"].get("prompt_tokens")
    return False


async def send_request(session: aiohttp.ClientSession, request: RequestInput) -> RequestResult:
    """Sends one streaming request; failures are recorded in the result, never raised."""
    result = RequestResult(prompt_len=request.prompt_len)
    text_parts: list[str] = []
    result.start_time = time.perf_counter()
    try:
        async with session.post(request.api_url, json=_payload(request)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            # Whole reads, split into events here, rather than `async for line in response.content`:
            # with hundreds of streams on a small machine, aiohttp's per-line machinery made this
            # client take CPU from the server it measures. Events that arrive in one read get one
            # timestamp: they did arrive together.
            pending = b""
            over = False
            async for data in response.content.iter_any():
                now = time.perf_counter()
                pending += data.replace(b"\r\n", b"\n") if b"\r" in data else data
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    over = _consume_event(event, now, result, text_parts, request.is_chat)
                    if over:
                        break
                if over:
                    break
            if not over and pending.strip():  # a last event without the blank line after it
                _consume_event(pending, time.perf_counter(), result, text_parts, request.is_chat)
        if result.error:
            return result
        result.generated_text = "".join(text_parts)
        if result.chunk_times:
            result.latency = result.chunk_times[-1] - result.start_time
        result.success = bool(result.chunk_times)
        if not result.success:
            result.error = "the stream ended without any output"
    except (aiohttp.ClientError, ValueError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result
