"""The unit a benchmark sends: a prompt with its expected output length, or a conversation."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Turn:
    """A later user turn of a conversation and how many tokens its answer should have."""

    user_message: str
    expected_output_len: int


@dataclass
class SampleRequest:
    """One benchmark request. `prompt_len` counts the prompt's tokens without special tokens.

    A multi-turn conversation is a SampleRequest whose first turn is `prompt` and whose later
    turns are `next_turns`; each later turn re-sends the history with the answers received so far.
    """

    prompt: str
    prompt_len: int
    expected_output_len: int
    next_turns: list[Turn] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        return 1 + len(self.next_turns)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


class RandomText:
    """Makes text of an exact number of random tokens for one tokenizer.

    Tokens are drawn from those that survive decode -> encode on their own (not special tokens,
    not lone bytes of a multi-byte character, which decode to U+FFFD). Neighbours can still merge
    across the joins, so the ids are re-read from the text and a growing tail is redrawn until the
    length holds.
    """

    def __init__(self, tokenizer, rng: random.Random):
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids)
        ids = [t for t in range(len(tokenizer)) if t not in special]
        texts = tokenizer.batch_decode([[t] for t in ids])
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.pool = [t for t, e in zip(ids, encoded) if e == [t]]
        if not self.pool:
            raise ValueError("tokenizer: no token survives decode -> encode; cannot make random prompts")

    def make(self, num_tokens: int) -> tuple[str, int]:
        """Returns (text, its token count); the count is `num_tokens` unless 10 redraws all failed."""
        if num_tokens <= 0:
            return "", 0
        ids: list[int] = []
        text = ""
        for attempt in range(10):
            ids += self.rng.choices(self.pool, k=num_tokens - len(ids))
            text = self.tokenizer.decode(ids)
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            if len(ids) == num_tokens:
                return text, num_tokens
            ids = ids[:max(0, min(len(ids), num_tokens) - 2 ** attempt)]
        return text, token_count(self.tokenizer, text)
