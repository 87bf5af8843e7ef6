"""What every endpoint handler reads: the engine and the facts about the served model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rtpllm.engine.async_engine import AsyncEngineBase
from rtpllm.serving.logprobs import TokenTexts


@dataclass
class ServingContext:
    engine: AsyncEngineBase
    model_name: str
    max_model_len: int
    tokenizer: Any
    vocab_size: int
    token_texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.tokenizer)

    @classmethod
    def for_engine(cls, engine: AsyncEngineBase) -> "ServingContext":
        return cls(engine=engine, model_name=engine.model_name, max_model_len=engine.max_model_len,
                   tokenizer=engine.tokenizer, vocab_size=engine.vocab_size)
