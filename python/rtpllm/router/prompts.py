"""The prompt tokens of a request body, as the instance will see them: the router hashes them to
predict cache hits and counts them to pick a lane.

Completions: the prompt's tokens (text through the tokenizer with its special tokens, or token
ids as given). Chat: the conversation through the model's chat template (serving/request_params.py,
the very code the instance runs). A body the router cannot read is still forwarded (the instance
answers it with its own 400); it is routed as a prompt of unknown tokens.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from pydantic import ValidationError

from rtpllm.router.policy import RoutingInput
from rtpllm.serving import request_params as rp
from rtpllm.serving.errors import OpenAIError
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


class PromptReader:
    def __init__(self, tokenizer: Optional[Any]):
        self.tokenizer = tokenizer
        self._vocab = len(tokenizer) if tokenizer is not None else 1 << 31

    def read(self, path: str, raw: bytes) -> tuple[RoutingInput, bool]:
        """(what routing needs, whether the client asked for a stream)."""
        try:
            body = json.loads(raw)
        except ValueError:
            return RoutingInput(None, 0), False
        stream = isinstance(body, dict) and body.get("stream") is True
        if self.tokenizer is None:
            return RoutingInput(None, _approximate_length(body)), stream
        try:
            if path.endswith("/chat/completions"):
                chat = ChatCompletionRequest.model_validate(body)
                tokens = rp.chat_prompt(chat.messages, self.tokenizer, chat.add_generation_prompt,
                                        chat.chat_template_kwargs)
                return RoutingInput(tokens, len(tokens)), stream
            prompts = rp.completion_prompts(CompletionRequest.model_validate(body), self.tokenizer, self._vocab)
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
