"""The prompt tokens of a request body, as the instance will see them: the router hashes them to
predict cache hits and counts them to pick a lane.

Completions: the prompt's tokens (text through the tokenizer with its special tokens, or token
ids as given). Chat: the conversation through the model's chat template (serving/request_params.py,
the very code the instance runs). A body the router cannot read is still forwarded (the instance
answers it with its own 400); it is routed as a prompt of unknown tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Optional

from pydantic import ValidationError

from rtpllm.router.policy import RoutingInput
from rtpllm.serving import request_params as rp
from rtpllm.serving.errors import OpenAIError
from rtpllm.serving.prompt_renderer import PromptRenderer
from rtpllm.serving.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """A Hugging Face tokenizer folder (a model folder) or a .gguf file's tokenizer."""
    if path.endswith(".gguf"):
        from rtpllm.loader.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer: {path} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# Bodies past this size are parsed off the event loop (their tokenizing always is, by the renderer).
_PARSE_INLINE_BYTES = 4096
# The router does not know the instances' context length; the instance enforces it.
_NO_CONTEXT_LIMIT = 1 << 30


class PromptReader:
    def __init__(self, tokenizer: Optional[Any]):
        self.tokenizer = tokenizer
        self._vocab = len(tokenizer) if tokenizer is not None else 1 << 31
        # The server's own renderer: off-loop tokenizing, and request chat templates never rendered
        # here (such a request is routed without its tokens; the instance answers it).
        self._renderer = PromptRenderer(tokenizer, _NO_CONTEXT_LIMIT) if tokenizer is not None else None

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()

    async def read(self, path: str, raw: bytes) -> tuple[RoutingInput, bool]:
        """(what routing needs, whether the client asked for a stream)."""
        try:
            body = json.loads(raw) if len(raw) <= _PARSE_INLINE_BYTES else await asyncio.to_thread(json.loads, raw)
        except ValueError:
            return RoutingInput(None, 0), False
        stream = isinstance(body, dict) and body.get("stream") is True
        if self.tokenizer is None:
            return RoutingInput(None, _approximate_length(body)), stream
        try:
            if path.endswith("/chat/completions"):
                chat = ChatCompletionRequest.model_validate(body)
                tokens = await rp.chat_prompt(chat, self._renderer)
                return RoutingInput(tokens, len(tokens)), stream
            prompts = await rp.completion_prompts(CompletionRequest.model_validate(body), self._renderer, self._vocab,
                                                  _NO_CONTEXT_LIMIT)
            return RoutingInput(prompts[0], sum(len(p) for p in prompts)), stream
        except (ValidationError, OpenAIError, ValueError, TypeError) as exc:
            logger.debug("routing %s without its tokens: %s", path, exc)
            return RoutingInput(None, 0), stream


def _approximate_length(body: Any) -> int:
    """Without a tokenizer: about 4 characters per token (lanes only; no cache prediction)."""
    if not isinstance(body, dict):
        return 0
    prompt = body.get("prompt", body.get("messages", ""))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return len(json.dumps(prompt)) // 4
