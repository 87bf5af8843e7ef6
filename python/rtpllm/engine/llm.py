"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as vLLM users know it."""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from rtpllm.config import EngineConfig
from rtpllm.engine.engine import Engine
from rtpllm.outputs import RequestOutput
from rtpllm.sampling_params import SamplingParams

PromptInput = Union[str, list[int], dict]
ChatMessages = list[dict[str, Any]]


class LLM:
    """Loads a model and generates for batches of prompts.

    `model` is a Hugging Face folder or a `.gguf` file (None: the built-in SmolLM2-135M-Instruct);
    engine options use vLLM's names (`dtype`, `block_size`, `max_num_batched_tokens`, `max_num_seqs`,
    `enable_prefix_caching`, `enable_chunked_prefill`, `gpu_memory_utilization`, `max_model_len`, ...).
    """

    def __init__(self, model: Optional[str] = None, **engine_options: Any):
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[PromptInput, Sequence[PromptInput]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run([_prompt_value(p) for p in prompt_list], params_list, use_tqdm)

    def chat(self, messages: Union[ChatMessages, Sequence[ChatMessages]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict[str, Any]] = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [apply_chat_template(self.engine.tokenizer, conv, add_generation_prompt, chat_template_kwargs)
                   for conv in conversations]
        return self._run(prompts, _as_params_list(sampling_params, len(prompts)), use_tqdm)

    def _run(self, prompts: list, params_list: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        queue = _RequestQueue(engine, list(zip(request_ids, prompts, params_list)))
        try:
            queue.add_next()
            finished = self._drain(set(request_ids), use_tqdm, queue)
        except BaseException:
            # Never leave half-done requests holding KV blocks behind a failed call.
            for request_id in request_ids:
                engine.abort_request(request_id)
            while engine.has_unfinished_requests():
                engine.step()
            raise
        return [finished[request_id] for request_id in request_ids]

    def _drain(self, waiting_for: set[str], use_tqdm: bool, queue: "_RequestQueue") -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(waiting_for), desc="Processed prompts", dynamic_ncols=True)
        while len(finished) < len(waiting_for):
            if not self.engine.has_unfinished_requests() and not queue.add_next():
                missing = sorted(waiting_for - set(finished))
                raise RuntimeError(f"engine went idle with requests unfinished: {missing[:5]}")
            for output in self.engine.step():
                if output.finished and output.request_id in waiting_for:
                    finished[output.request_id] = output
                    if progress is not None:
                        progress.update(1)
            queue.add_next()
        if progress is not None:
            progress.close()
        return finished


class _RequestQueue:
    """An offline batch's requests, added to the engine a slice at a time: the first before the
    first step, each next one right after a step. On a GPU a step runs asynchronously, so the
    next slice is tokenized (in one batch: the fast tokenizer uses every core) while the device
    works; tokenizing 1000 prompts of 1K tokens before the first step kept an H100 idle ~0.5 s.
    A slice holds at least as many requests as one step may admit (max_num_seqs), so the
    scheduler never runs short of waiting requests."""

    MIN_SLICE = 256

    def __init__(self, engine, requests: list[tuple[str, PromptInput, SamplingParams]]):
        self._engine = engine
        self._requests = requests
        self._next = 0
        self._slice = max(self.MIN_SLICE, engine.config.scheduler.max_num_seqs)

    def add_next(self) -> bool:
        """Adds the next slice; False when every request was already added."""
        if self._next >= len(self._requests):
            return False
        chunk = self._requests[self._next:self._next + self._slice]
        self._next += len(chunk)
        encoded = iter(self._engine.encode_prompts([p for _, p, _ in chunk if isinstance(p, str) and p]))
        for request_id, prompt, params in chunk:
            ids = next(encoded) if isinstance(prompt, str) and prompt else None
            self._engine.add_request(request_id, prompt, params, stream=False, prompt_token_ids=ids)
        return True


def apply_chat_template(tokenizer, messages: ChatMessages, add_generation_prompt: bool = True,
                        chat_template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
    """Renders a conversation through the model's chat template into prompt token ids."""
    if not messages:
        raise ValueError("messages: empty conversation")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}]: each message needs 'role' and 'content'")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **(chat_template_kwargs or {}))
    # The template already holds BOS and the other special tokens it wants.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty list")
    return prompts


def _prompt_value(prompt) -> Union[str, list[int]]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("prompts: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    return prompt


def _as_params_list(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"sampling_params: {len(params)} given for {count} prompts")
    return params
