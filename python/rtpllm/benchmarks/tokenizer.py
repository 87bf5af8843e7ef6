"""The tokenizer a benchmark builds prompts and counts tokens with, without loading any weights."""

from __future__ import annotations

import os
from typing import Optional


def load_tokenizer(path: Optional[str]):
    """A Hugging Face folder, a `.gguf` file (its embedded tokenizer), or None for the built-in
    default model's tokenizer."""
    from transformers import AutoTokenizer

    if path is None:
        from rtpllm.engine.default_model import default_model_path

        path = default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer: {path} does not exist")
    try:
        if path.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one clear message
        raise ValueError(f"tokenizer: cannot load a tokenizer from {path} ({type(exc).__name__}: {exc})") from exc
