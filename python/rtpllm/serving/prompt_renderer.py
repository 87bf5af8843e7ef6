"""Text to token ids and conversations to text, off the event loop.

    renderer = PromptRenderer(tokenizer, max_model_len, trust_request_chat_template=False)
    ids = await renderer.encode(text, param="prompt", context_limit=True)
    text = await renderer.render_chat(messages, add_generation_prompt=True, kwargs={}, request_template=None)

Tokenizing a long prompt or rendering a chat template can take seconds; on the event loop that
would stall every other request (and the health check). Both run in thread pools (the tokenizer
releases the GIL while it works, templates are Python and share it in 5 ms slices): work on more
than `_LARGE_CHARS` characters in a pool of its own, so that a few huge requests queue behind each
other and never ahead of ordinary ones. Text of at most `_INLINE_CHARS` characters is tokenized in
place: that takes less time than the hand-off.

A prompt far over the context is refused before all of it is tokenized: its first
`_CHARS_PER_TOKEN * max_model_len` characters are tokenized first, and if they alone overflow the
context the request is refused.

Chat templates: the model's own is trusted. One a request brings runs only with
`trust_request_chat_template`, in Hugging Face's sandboxed Jinja environment (no file or attribute
escape), in a thread of its own that is stopped after `REQUEST_TEMPLATE_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from rtpllm.serving.deadline_thread import DeadlineExceeded, run_with_deadline
from rtpllm.serving.errors import OpenAIError, bad_request

_INLINE_CHARS = 256  # about 0.2 ms of tokenizing, what a thread hand-off costs on a busy 2-core machine
_LARGE_CHARS = 64 * 1024  # about 50 ms of tokenizing
_CHARS_PER_MESSAGE = 64  # what rendering one chat message costs, in characters of tokenizing
_CHARS_PER_TOKEN = 8  # real tokenizers average 3 to 5 characters per token
REQUEST_TEMPLATE_TIMEOUT_S = 5.0
_MAX_CONCURRENT_REQUEST_TEMPLATES = 4


class PromptRenderer:
    def __init__(self, tokenizer: Any, max_model_len: int, trust_request_chat_template: bool = False,
                 max_workers: int = 2):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.trust_request_chat_template = trust_request_chat_template
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rtpllm-tokenize")
        self._large_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtpllm-tokenize-large")
        self._request_templates = asyncio.Semaphore(_MAX_CONCURRENT_REQUEST_TEMPLATES)
        # apply_chat_template's own parameters are not template variables a request may set.
        apply = getattr(tokenizer, "apply_chat_template", None)
        self._reserved_kwargs = frozenset(
            inspect.signature(apply).parameters) - {"kwargs", "self"} if apply is not None else frozenset()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._large_pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, size: int, fn, *args):
        """`fn(*args)` off the event loop, for work on about `size` characters of request data."""
        pool = self._large_pool if size > _LARGE_CHARS else self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt",
                     context_limit: bool = False) -> list[int]:
        """`text`'s token ids. With `context_limit`, a text over the context length is refused with a
        400 naming `param` (a text only a little over it is tokenized whole; the caller checks it)."""
        if len(text) <= _INLINE_CHARS:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        head_chars = _CHARS_PER_TOKEN * self.max_model_len
        if context_limit and len(text) > head_chars:
            head = await self.run(head_chars, self._encode, text[:head_chars], add_special_tokens)
            # +1: the cut may split what the whole text tokenizes as one token.
            if len(head) > self.max_model_len + 1:
                raise OpenAIError(
                    f"{param}: longer than this model's maximum context length of {self.max_model_len} tokens "
                    f"(its first {head_chars} characters alone are {len(head)} tokens)",
                    param=param, code="context_length_exceeded")
        return await self.run(len(text), self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if len(token_ids) <= _INLINE_CHARS // 4:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return await self.run(4 * len(token_ids),
                              lambda: self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    async def render_chat(self, conversation: list[dict], add_generation_prompt: bool,
                          kwargs: Optional[dict[str, Any]], request_template: Optional[str],
                          param: str = "messages") -> str:
        """The conversation as text through the model's chat template, or `request_template` (a 400
        unless the server trusts request templates)."""
        kwargs = dict(kwargs or {})
        if "chat_template" in kwargs:
            if request_template is not None:
                raise bad_request("chat_template: given twice (also in chat_template_kwargs)", param="chat_template")
            request_template = kwargs.pop("chat_template")
            template_param = "chat_template_kwargs.chat_template"
        else:
            template_param = "chat_template"
        reserved = sorted(self._reserved_kwargs.intersection(kwargs))
        if reserved:
            raise bad_request(f"chat_template_kwargs.{reserved[0]}: not a template variable a request may set",
                              param=f"chat_template_kwargs.{reserved[0]}")
        if request_template is not None:
            return await self._render_request_template(conversation, add_generation_prompt, kwargs,
                                                       request_template, template_param)
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"{param}: this model's tokenizer has no chat template", param=param)
        try:
            # Each message costs the template some work of its own, whatever its length.
            size = sum(len(message["content"]) + _CHARS_PER_MESSAGE for message in conversation)
            return await self.run(size, self._apply_template, conversation, add_generation_prompt, kwargs, None)
        except Exception as exc:  # noqa: BLE001 - template errors come from the client's messages
            raise bad_request(f"{param}: the chat template rejected the conversation: {exc}", param=param) from exc

    async def _render_request_template(self, conversation: list[dict], add_generation_prompt: bool,
                                       kwargs: dict[str, Any], template: Any, param: str) -> str:
        if not self.trust_request_chat_template:
            raise bad_request(f"{param}: this server does not render chat templates sent with requests "
                              "(start it with --trust-request-chat-template to allow them)", param=param)
        if not isinstance(template, str) or not template:
            raise bad_request(f"{param}: must be a non-empty string", param=param)
        async with self._request_templates:
            try:
                return await run_with_deadline(
                    lambda: self._apply_template(conversation, add_generation_prompt, kwargs, template),
                    REQUEST_TEMPLATE_TIMEOUT_S)
            except DeadlineExceeded as exc:
                raise bad_request(f"{param}: rendering took longer than {REQUEST_TEMPLATE_TIMEOUT_S:g}s",
                                  param=param) from exc
            except Exception as exc:  # noqa: BLE001 - the client's template failed
                raise bad_request(f"{param}: the chat template failed: {exc}", param=param) from exc

    def _apply_template(self, conversation, add_generation_prompt, kwargs, template) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=template,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)
