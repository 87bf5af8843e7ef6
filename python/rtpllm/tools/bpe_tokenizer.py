"""A real byte-level BPE tokenizer of any vocabulary size, made in well under a second.

Random-weight checkpoints (benchmarks, tests) still need a tokenizer that `AutoTokenizer` loads,
that round-trips any text, and whose ids cover the model's whole vocabulary, since a random model
samples every id. This trains byte-level BPE merges on text that ships with Python (the standard
library's docstrings), then, when the target is larger than that text supports, appends further
merges made by joining existing tokens, and puts the special tokens last (as Llama 3 and Qwen do).
"""

from __future__ import annotations

import json
from typing import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|endoftext|>"  # the name Qwen2Tokenizer expects; transformers picks that class for Qwen folders
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Merges learned from the corpus; the corpus (~0.5 MB) cannot support many more, and training
# time grows with it. Larger vocabularies are completed with joined tokens.
_MAX_LEARNED_VOCAB = 4096
_BYTE_ALPHABET = 256


def _corpus() -> Iterator[str]:
    import argparse, asyncio, builtins, collections, dataclasses, functools, inspect, itertools  # noqa: E401
    import json as json_module, logging, os, pathlib, re, subprocess, threading  # noqa: E401

    modules = (builtins, collections, json_module, os, re, itertools, functools, dataclasses, pathlib,
               argparse, logging, subprocess, threading, asyncio, inspect)
    for module in modules:
        yield module.__doc__ or ""
        for name in sorted(vars(module)):
            doc = getattr(vars(module)[name], "__doc__", None)
            if isinstance(doc, str):
                yield doc


def build_bpe_tokenizer(vocab_size: int, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids: BPE tokens first, then the four
    SPECIAL_TOKENS (ids vocab_size-4 .. vocab_size-1). `add_bos` prepends BOS_TOKEN when encoding,
    as Llama tokenizers do; the chat template is ChatML (IM_START / IM_END)."""
    num_bpe = vocab_size - len(SPECIAL_TOKENS)
    if num_bpe < _BYTE_ALPHABET:
        raise ValueError(f"vocab_size: must be at least {_BYTE_ALPHABET + len(SPECIAL_TOKENS)} "
                         f"(the 256 bytes plus {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    learned = Tokenizer(models.BPE())
    learned.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(num_bpe, _MAX_LEARNED_VOCAB), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learned.train_from_iterator(_corpus(), trainer)
    state = json.loads(learned.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges: list[tuple[str, str]] = [tuple(pair) for pair in state["merges"]]
    _extend_with_joined_tokens(vocab, merges, num_bpe)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, chat_template=CHATML_TEMPLATE,
                                   add_bos_token=add_bos)


def _extend_with_joined_tokens(vocab: dict[str, int], merges: list[tuple[str, str]], size: int) -> None:
    # Each new token is the concatenation of two existing ones, with the merge that produces it,
    # so the result is still a valid BPE model; they are just rarely applied to real text.
    tokens = sorted(vocab, key=vocab.get)
    for left in tokens:
        for right in tokens:
            if len(vocab) >= size:
                return
            joined = left + right
            if joined not in vocab:
                vocab[joined] = len(vocab)
                merges.append((left, right))
    if len(vocab) < size:
        raise ValueError(f"vocab_size: cannot build {size} BPE tokens")
