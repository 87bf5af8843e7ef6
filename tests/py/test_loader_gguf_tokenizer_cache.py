"""The GGUF tokenizer is converted once, then read back from the cache with identical behaviour."""

import os

from checkpoints import checkpoint_path
from gguf_checkpoints import write_gguf
from rtpllm.loader.gguf_tokenizer import load_gguf_tokenizer

TEXTS = ["hello world", "The quick brown fox, 123 ünïcödé 🤖", "<|im_start|>user\nhi<|im_end|>"]


def test_second_load_comes_from_the_cache_and_tokenizes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(checkpoint_path("gqa9x3"), str(tmp_path / "model.gguf"))
    converted = load_gguf_tokenizer(path)
    entries = os.listdir(tmp_path / "cache" / "gguf-tokenizers")
    assert len(entries) == 1
    cached = load_gguf_tokenizer(path)
    assert os.listdir(tmp_path / "cache" / "gguf-tokenizers") == entries
    for text in TEXTS:
        assert cached.encode(text) == converted.encode(text)
        ids = converted.encode(text)
        assert cached.decode(ids) == converted.decode(ids)
    assert cached.chat_template == converted.chat_template
    assert (cached.bos_token_id, cached.eos_token_id) == (converted.bos_token_id, converted.eos_token_id)


def test_a_changed_file_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(checkpoint_path("gqa9x3"), str(tmp_path / "model.gguf"))
    load_gguf_tokenizer(path)
    os.utime(path, ns=(1, 1))  # a new modification time: a different file for the cache
    load_gguf_tokenizer(path)
    assert len(os.listdir(tmp_path / "cache" / "gguf-tokenizers")) == 2


def test_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(checkpoint_path("gqa9x3"), str(tmp_path / "model.gguf"))
    expected = load_gguf_tokenizer(path).encode(TEXTS[1])
    (entry,) = os.listdir(tmp_path / "cache" / "gguf-tokenizers")
    for name in os.listdir(tmp_path / "cache" / "gguf-tokenizers" / entry):
        with open(tmp_path / "cache" / "gguf-tokenizers" / entry / name, "w") as f:
            f.write("{not json")
    assert load_gguf_tokenizer(path).encode(TEXTS[1]) == expected
