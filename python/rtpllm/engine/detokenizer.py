"""The text of one sequence as its tokens arrive: incremental detokenization and stop strings.

`IncrementalDetokenizer.push(ids)` returns only text that is complete: a token that ends inside a
multi-byte UTF-8 character (byte-level BPE splits emoji and CJK into such pieces) is held back until
the following tokens complete it, so a stream never shows a replacement character that the final
text would not have. `StopStringChecker.check(text)` then cuts the text at a stop string and says
how many trailing characters could still grow into one, so a stream never shows part of a stop
string either.

Engine usage per sequence:
    text += detok.push(new_ids)
    check = stop_checker.check(text)      # check.stop_string is not None: stop; text = check.text
    visible = check.text[:len(check.text) - check.hold_back]
    ... on any other finish: text += detok.flush(); everything is visible.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Sequence

_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """A transformers tokenizer or a `tokenizers.Tokenizer`: both decode this way."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def direct_decode(tokenizer: Decoder) -> Callable[..., str]:
    """`tokenizer.decode`, or the Rust `tokenizers.Tokenizer.decode` under it when that returns the
    same text. transformers' `decode` wraps that call in argument normalization costing several
    times the decode of a few ids, and the detokenizer decodes two short windows per token of every
    streamed sequence. The same: a fast tokenizer that overrides neither `decode` nor `_decode`
    and applies no `clean_up_tokenization_spaces` (which transformers also skips for BPE models)."""
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency; a bare Tokenizer works anyway
        return tokenizer.decode
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer.decode  # a `tokenizers.Tokenizer` (already direct) or a slow tokenizer
    cls = type(tokenizer)
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not PreTrainedTokenizerFast._decode:
        return tokenizer.decode
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not _cleanup_is_skipped(tokenizer, backend):
        return tokenizer.decode
    return backend.decode


def _cleanup_is_skipped(tokenizer, backend) -> bool:
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return True
    # transformers >= 5 ignores the clean-up for BPE models unless forced; older versions apply it.
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
    return forced is False and type(backend.model).__name__ == "BPE"


class IncrementalDetokenizer:
    """Decodes a growing list of output tokens into text deltas in O(window) per token.

    It decodes two short windows of ids per step: `ids[prefix:read]` (text already emitted) and
    `ids[prefix:]` (that plus the new tokens); the difference is the new text. Decoding from
    `prefix` rather than from the first token keeps the cost constant, while the one-step-back
    context lets decoders that render a token differently at the start of a decode call (e.g. a
    SentencePiece "▁" word marker) produce the same characters as in a full decode.

    The first window starts with the last few prompt tokens as context, so the output text is the
    continuation of the prompt: `decode(prompt + out) == decode(prompt) + text`. For byte-level BPE
    tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM) that is exactly `decode(out)`.
    After `flush()`, the concatenated deltas are the whole text.
    """

    # Enough prompt tokens to give the first output token its left context.
    PROMPT_CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._decode_fn = direct_decode(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        context = [int(t) for t in list(prompt_token_ids)[-self.PROMPT_CONTEXT_TOKENS:]]
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character (a token-id prompt can): its bytes would merge with
            # the output's and make the context's text change, so decode the output on its own.
            context = []
        # NOTE: only the window ids[prefix_offset:] is kept; ids before it are dropped as it slides.
        self._ids: list[int] = context
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # ids before this have had their text emitted
        self._emitted_text: Optional[str] = None  # decode of ids[prefix_offset:read_offset], once known

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the text they complete (possibly "", never a partial character)."""
        if len(new_token_ids) == 0:
            return ""
        self._ids += map(int, new_token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Returns all text not yet emitted, incomplete characters included (as the tokenizer
        renders them, usually U+FFFD). Call once when the sequence finishes."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        emitted_text = self._emitted_text
        if emitted_text is None:
            emitted_text = self._emitted_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(full_text) <= len(emitted_text) or full_text.endswith(_REPLACEMENT_CHAR)):
            # No new text yet (a skipped special token) or it ends mid-character: wait for more
            # tokens without moving the window, so the next decode still sees the left context.
            return ""
        delta = full_text[len(emitted_text):]
        # Slide: the ids just emitted become the next step's context.
        del self._ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted_text = None
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._decode_fn(ids, skip_special_tokens=self._skip_special_tokens)


class StopCheck(NamedTuple):
    text: str  # the output text, cut at the stop string when one matched
    stop_string: Optional[str]  # the stop string that matched, or None
    hold_back: int  # trailing characters of `text` that may begin a stop string: don't stream them yet


class StopStringChecker:
    """Finds stop strings in a sequence's growing output text.

    Pass the cumulative text to `check()` each time it grows; only the part that could contain a
    stop string ending in the new characters is searched, so each check costs O(new text + longest
    stop string). When several stop strings end in the new text, the one that completes first wins
    (as if the text had arrived one character at a time, so the result does not depend on how it
    was split into tokens); among those ending at the same character, the one starting earliest.
    """

    def __init__(self, stop_strings: Sequence[str], include_stop_str_in_output: bool = False):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings: must be a non-empty list of non-empty strings, got {stop_strings!r}")
        self.stop_strings = tuple(dict.fromkeys(stop_strings))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._checked_len = 0  # characters of the text already searched

    def check(self, text: str) -> StopCheck:
        if len(text) < self._checked_len:
            raise ValueError(f"text: {len(text)} characters, fewer than the {self._checked_len} checked "
                             "before; pass the cumulative output text")
        new_start, self._checked_len = self._checked_len, len(text)
        match = find_stop_string(text, self.stop_strings, new_start)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self.include_stop_str_in_output else start
            return StopCheck(text=text[:end], stop_string=stop, hold_back=0)
        return StopCheck(text=text, stop_string=None, hold_back=_longest_stop_prefix_suffix(text, self.stop_strings))


def find_stop_string(text: str, stop_strings: Sequence[str], new_start: int) -> Optional[tuple[int, str]]:
    """(start index, stop string) of the first stop string to complete at or after text[new_start],
    or None. Occurrences ending before new_start are ignored (they were searched before)."""
    best: Optional[tuple[int, int, str]] = None  # (end, start, stop)
    for stop in stop_strings:
        # The match must end after new_start, so it may begin up to len(stop) - 1 characters earlier.
        start = text.find(stop, max(0, new_start - len(stop) + 1))
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _longest_stop_prefix_suffix(text: str, stop_strings: Sequence[str]) -> int:
    """The length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
