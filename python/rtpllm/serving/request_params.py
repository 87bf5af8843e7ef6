"""From a validated request body to what the engine takes: prompt token ids and SamplingParams.

Everything the client can get wrong is checked here, before the engine sees the request, so the
answer is a 400 naming the field: the model name, empty prompts, token ids outside the vocabulary,
a prompt that fills the context, `max_tokens` that do not fit, more sequences than the engine can
batch (`check_request_size`), integers the engine cannot hold (`seed`, `top_k`), and the sampling
ranges (which `SamplingParams` validates with messages that start with the field name; NaN and
infinity never get that far: protocol.py refuses them).
"""

from __future__ import annotations

from typing import Optional

from rtpllm.engine.async_engine import EngineLimits
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.errors import OpenAIError, bad_request, from_value_error
from rtpllm.serving.prompt_renderer import PromptRenderer
from rtpllm.serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingRequest

MAX_LOGPROBS = 20
# Seeds seed torch generators (64-bit); top_k ends up in an int64 tensor and means nothing past the vocabulary.
SEED_RANGE = (-2**63, 2**63 - 1)
TOP_K_MAX = 2**31 - 1
# The engine checks every stop string and stop token at every generated token: bounded, so that one
# request cannot slow every step of everyone's (OpenAI allows 4 stop strings).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


def check_model(requested: Optional[str], served_model_name: str) -> None:
    if requested is not None and requested != served_model_name:
        raise bad_request(f"model: `{requested}` does not exist; this server serves `{served_model_name}`",
                          param="model", code="model_not_found")


async def completion_prompts(request: CompletionRequest, renderer: PromptRenderer, vocab_size: int,
                             max_model_len: int, limits: Optional[EngineLimits] = None) -> list[list[int]]:
    """The request's prompts as token ids (text gets the tokenizer's special tokens, like BOS).
    A prompt longer than the context, or a batch with more sequences than `limits` allow, is
    refused before anything is tokenized or scanned in full."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt: empty list", param="prompt")
    _check_num_sequences(request, len(prompts), limits)
    token_lists = []
    for i, item in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(item, str):
            if not item:
                raise bad_request(f"{where}: empty string", param=where)
            ids = await renderer.encode(item, param=where, context_limit=True)
        else:
            if not item:
                raise bad_request(f"{where}: empty token list", param=where)
            if len(item) >= max_model_len:
                _raise_prompt_too_long(where, len(item), max_model_len)
            check_token_ids(item, vocab_size, where)
            ids = list(item)
        token_lists.append(ids)
    return token_lists


def conversation(messages: list[ChatMessage], param: str = "messages") -> list[dict]:
    """The messages as the chat template reads them."""
    if not messages:
        raise bad_request(f"{param}: must hold at least one message", param=param)
    return [{"role": m.role, "content": m.text()} for m in messages]


async def chat_prompt(request: ChatCompletionRequest, renderer: PromptRenderer) -> list[int]:
    """The conversation as prompt token ids."""
    text = await renderer.render_chat(conversation(request.messages), request.add_generation_prompt,
                                      request.chat_template_kwargs, request.chat_template)
    # The template already placed BOS and every other special token it wants.
    return await renderer.encode(text, add_special_tokens=False, param="messages", context_limit=True)


def check_request_size(request: SamplingRequest, num_prompts: int, max_new_tokens: list[int],
                       limits: Optional[EngineLimits]) -> None:
    """A request may not ask for more sequences than one batch holds (they would all wait ahead of
    every later request), nor for more output tokens than the whole KV cache holds."""
    if limits is None:
        return
    _check_num_sequences(request, num_prompts, limits)
    total = request.n * sum(max_new_tokens)
    if total > limits.kv_cache_tokens:
        if getattr(request, "max_completion_tokens", None) is not None:
            param = "max_completion_tokens"
        else:
            param = "max_tokens" if request.max_tokens is not None else "n"  # n x the rest of the context
        raise bad_request(f"{param}: n={request.n} sequences of up to {max(max_new_tokens)} new tokens make {total} "
                          f"tokens, more than this server's KV cache holds ({limits.kv_cache_tokens})", param=param)


def _check_num_sequences(request: SamplingRequest, num_prompts: int, limits: Optional[EngineLimits]) -> None:
    if limits is None:
        return
    if request.n > limits.max_num_seqs:
        raise bad_request(f"n: must be at most {limits.max_num_seqs} (this server's max_num_seqs), got {request.n}",
                          param="n")
    if num_prompts * request.n > limits.max_num_seqs:
        raise bad_request(f"prompt: {num_prompts} prompts x n={request.n} make {num_prompts * request.n} sequences; "
                          f"at most {limits.max_num_seqs} (this server's max_num_seqs) fit one request",
                          param="prompt")


def check_stops(request: SamplingRequest, vocab_size: int) -> None:
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > MAX_STOP_STRINGS or any(len(stop) > MAX_STOP_STRING_CHARS for stop in stops):
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters",
                          param="stop")
    if request.stop_token_ids:
        if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(request.stop_token_ids)}",
                              param="stop_token_ids")
        check_token_ids(request.stop_token_ids, vocab_size, "stop_token_ids")


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return  # NOTE: the usual case, scanned in C (a 4k-token prompt: ~0.05 ms instead of ~0.2)
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"{param}: token ids must be in [0, {vocab_size}), got {bad[:5]}", param=param)


def max_new_tokens(requested: Optional[int], prompt_len: int, max_model_len: int,
                   param: str = "max_tokens", prompt_param: str = "prompt") -> int:
    """The output budget: what was asked for, or the rest of the context when nothing was."""
    if prompt_len >= max_model_len:
        _raise_prompt_too_long(prompt_param, prompt_len, max_model_len)
    if requested is None:
        return max_model_len - prompt_len
    if requested < 1:
        raise bad_request(f"{param}: must be at least 1, got {requested}", param=param)
    if prompt_len + requested > max_model_len:
        raise OpenAIError(
            f"{param}: this model's maximum context length is {max_model_len} tokens, but {prompt_len} prompt "
            f"tokens plus {param}={requested} would need {prompt_len + requested}",
            param=param, code="context_length_exceeded")
    return requested


def _raise_prompt_too_long(param: str, prompt_len: int, max_model_len: int) -> None:
    raise OpenAIError(f"{param}: {prompt_len} tokens leave no room to generate; this model's maximum "
                      f"context length is {max_model_len} tokens", param=param, code="context_length_exceeded")


def sampling_params(request: SamplingRequest, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
    """SamplingParams for one prompt of the request; OpenAI's defaults where the body is silent."""
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        name = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
        raise bad_request(f"{name}: must be in [0, {MAX_LOGPROBS}], got {logprobs}", param=name)
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise bad_request(f"seed: must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (a signed 64-bit integer), "
                          f"got {request.seed}", param="seed")
    if request.top_k is not None and not -1 <= request.top_k <= TOP_K_MAX:
        raise bad_request(f"top_k: must be -1 or 0 (off) or in [1, {TOP_K_MAX}], got {request.top_k}", param="top_k")
    try:
        return SamplingParams(
            n=request.n,
            temperature=_default(request.temperature, 1.0),
            top_p=_default(request.top_p, 1.0),
            top_k=_default(request.top_k, 0),
            min_p=_default(request.min_p, 0.0),
            presence_penalty=_default(request.presence_penalty, 0.0),
            frequency_penalty=_default(request.frequency_penalty, 0.0),
            repetition_penalty=_default(request.repetition_penalty, 1.0),
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output)
    except ValueError as exc:
        raise from_value_error(exc) from exc


def completion_logprobs_count(request: CompletionRequest) -> Optional[int]:
    if request.echo and request.logprobs is not None:
        raise bad_request("echo: not supported together with logprobs", param="echo")
    if request.suffix is not None:
        raise bad_request("suffix: not supported", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request(f"best_of: only best_of == n is supported, got best_of={request.best_of}, "
                          f"n={request.n}", param="best_of")
    return request.logprobs


def chat_logprobs_count(request: ChatCompletionRequest) -> Optional[int]:
    if request.tools:
        raise bad_request("tools: tool calling is not supported", param="tools")
    if request.tool_choice not in (None, "none"):
        raise bad_request("tool_choice: tool calling is not supported", param="tool_choice")
    if request.response_format not in (None, {"type": "text"}):
        raise bad_request("response_format: only {\"type\": \"text\"} is supported", param="response_format")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs: needs logprobs set to true", param="top_logprobs")
    if not request.logprobs:
        return None
    return request.top_logprobs or 0


def chat_max_tokens(request: ChatCompletionRequest) -> tuple[Optional[int], str]:
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


def _default(value, fallback):
    return fallback if value is None else value
