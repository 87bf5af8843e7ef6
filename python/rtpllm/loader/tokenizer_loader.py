"""A model's tokenizer alone (a Hugging Face folder or a GGUF file), without torch or the model.

The server loads its own copy with this while its engine process loads the model, instead of
receiving the engine's pickled tokenizer once the engine is ready (unpickling a 128k-token
tokenizer costs the server most of a second after the engine is up).
"""

from __future__ import annotations

import os

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_tokenizer_files(folder: str) -> None:
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer: none of {list(_TOKENIZER_FILES)} in {folder}")


def load_folder_tokenizer(folder: str):
    """The transformers fast tokenizer of a folder (`AutoTokenizer`), chat template included."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer: {folder} does not exist")
    check_tokenizer_files(folder)
    from transformers import AutoTokenizer  # 1-2 s of imports: only where a tokenizer is loaded

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from None


def load_tokenizer(model_path: str):
    """The tokenizer `load_model_and_tokenizer(model_path)` would return."""
    if os.path.isdir(model_path):
        return load_folder_tokenizer(model_path)
    if model_path.endswith(".gguf"):
        from rtpllm.loader.gguf_tokenizer import load_gguf_tokenizer

        name = os.path.basename(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"model: {model_path} does not exist")
        try:
            return load_gguf_tokenizer(model_path)
        except Exception as e:
            raise ValueError(f"{name}: cannot build the tokenizer from the GGUF metadata "
                             f"({type(e).__name__}: {e})") from None
    raise ValueError(f"model: {model_path} is neither a Hugging Face model folder nor a .gguf file")
