"""What every endpoint handler reads: the engine and the facts about the served model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rtpllm.engine.async_engine import AsyncEngineBase, EngineLimits
from rtpllm.serving.logprobs import TokenTexts
from rtpllm.serving.prompt_renderer import PromptRenderer


@dataclass
class ServingContext:
    engine: AsyncEngineBase
    model_name: str
    max_model_len: int
    tokenizer: Any
    vocab_size: int
    limits: Optional[EngineLimits] = None  # None: requests are bounded by the context length only
    trust_request_chat_template: bool = False
    token_texts: TokenTexts = field(init=False)
    renderer: PromptRenderer = field(init=False)  # tokenizing and chat templates, off the event loop

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.tokenizer)
        self.renderer = PromptRenderer(self.tokenizer, self.max_model_len, self.trust_request_chat_template)

    @classmethod
    def for_engine(cls, engine: AsyncEngineBase, trust_request_chat_template: bool = False) -> "ServingContext":
        return cls(engine=engine, model_name=engine.model_name, max_model_len=engine.max_model_len,
                   tokenizer=engine.tokenizer, vocab_size=engine.vocab_size, limits=engine.limits,
                   trust_request_chat_template=trust_request_chat_template)
