"""Log-probabilities in the two OpenAI layouts (legacy completions and chat).

The engine gives one dict per generated position: token id -> logprob, the sampled token first,
then the requested top alternatives (a sampled token that is also in the top appears once).
"""

from __future__ import annotations

from typing import Optional

from rtpllm.outputs import TokenLogprobs
from rtpllm.serving.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


class TokenTexts:
    """Decodes single tokens for logprob listings, remembering them: the same few thousand ids recur."""

    def __init__(self, tokenizer, capacity: int = 1 << 16):
        self._tokenizer = tokenizer
        self._capacity = capacity
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            if len(self._texts) >= self._capacity:
                self._texts.clear()
            self._texts[token_id] = text
        return text


def _top(entry: TokenLogprobs, num_top: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:num_top]


def completion_logprobs(texts: TokenTexts, token_ids: list[int], entries: list[TokenLogprobs],
                        num_top: int, text_offset: int) -> CompletionLogprobs:
    """The legacy layout; `text_offset` is where the first token's text starts in the choice's text."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = texts(token_id)
        result.tokens.append(token)
        result.token_logprobs.append(entry.get(token_id))
        result.text_offset.append(text_offset)
        text_offset += len(token)
        result.top_logprobs.append({texts(t): lp for t, lp in _top(entry, num_top)} if num_top else None)
    return result


def chat_logprobs(texts: TokenTexts, token_ids: list[int], entries: list[TokenLogprobs],
                  num_top: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        token = texts(token_id)
        content.append(ChatTokenLogprob(
            token=token, logprob=_finite(entry.get(token_id)), bytes=list(token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=texts(t), logprob=_finite(lp), bytes=list(texts(t).encode("utf-8")))
                          for t, lp in _top(entry, num_top)]))
    return ChatLogprobs(content=content)


def _finite(value: Optional[float]) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
    if value is None or value != value or value == float("-inf"):
        return -9999.0
    return value
