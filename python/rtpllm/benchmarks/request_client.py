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


async def send_request(session: aiohttp.ClientSession, request: RequestInput) -> RequestResult:
    """Sends one streaming request; failures are recorded in the result, never raised."""
    result = RequestResult(prompt_len=request.prompt_len)
    text_parts: list[str] = []
    start = result.start_time = time.perf_counter()
    last_chunk = start
    try:
        async with session.post(request.api_url, json=_payload(request)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if not result.chunk_times:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last_chunk)
                    last_chunk = now
                    result.chunk_times.append(now)
                    text_parts.append(_choice_text(chunk["choices"][0], request.is_chat))
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens")
                    result.usage_prompt_tokens = chunk["usage"].get("prompt_tokens")
        result.generated_text = "".join(text_parts)
        result.latency = last_chunk - start
        result.success = bool(result.chunk_times)
        if not result.success:
            result.error = "the stream ended without any output"
    except (aiohttp.ClientError, ValueError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result
