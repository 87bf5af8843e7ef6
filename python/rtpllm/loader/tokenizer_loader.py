"""A model's tokenizer alone (a Hugging Face folder or a GGUF file), without torch or the model.

The server loads its own copy with this while its engine process loads the model (which loads
none unless a request needs it: loader/lazy_tokenizer.py), instead of receiving the engine's
pickled tokenizer once the engine is ready (unpickling a 128k-token tokenizer costs the server most
of a second after the engine is up). `special_token_id` reads an id (EOS) off the files alone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from rtpllm.loader.auto_tokenizer_tables import auto_tokenizer_tables

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_BACKEND_NAMES = ("TokenizersBackend", "PreTrainedTokenizerFast")  # one class in transformers 5


def check_tokenizer_files(folder: str) -> None:
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer: none of {list(_TOKENIZER_FILES)} in {folder}")


def load_folder_tokenizer(folder: str, parts: Optional[list[tuple[str, float]]] = None):
    """The transformers fast tokenizer of a folder (what `AutoTokenizer` gives), chat template
    included. `parts` gets what the load was made of: ("imports", s) then ("files", s)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer: {folder} does not exist")
    check_tokenizer_files(folder)
    start = time.perf_counter()
    try:
        backend = tokenizers_backend_for(folder)
        if backend is None:
            from transformers import AutoTokenizer  # 1-2 s of imports: only where a tokenizer is loaded

            backend = AutoTokenizer
        imported = time.perf_counter()
        # transformers asks the Hub nothing about a local folder (checked with transformers 5.17
        # and 5.25 in a network namespace of its own: no connection attempted); local_files_only
        # keeps it so in versions to come.
        tokenizer = backend.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from None
    if parts is not None:
        parts += [("imports", imported - start), ("files", time.perf_counter() - imported)]
    return tokenizer


def tokenizers_backend_for(folder: str):
    """transformers' `TokenizersBackend` class where `AutoTokenizer.from_pretrained(folder)` would
    pick it anyway, else None (then AutoTokenizer decides). Loading it directly skips AutoTokenizer's
    imports and its `AutoConfig` step: importing `tokenization_auto` imports torch and, in
    transformers 5.17, torch._dynamo, the generation utilities and accelerate (seconds on the
    server's tokenizer thread, holding the GIL) only to learn the model type's tokenizer class,
    which auto_tokenizer_tables.py reads from transformers' source instead.

    It is that class (transformers 5's AutoTokenizer) when tokenizer_config.json names it or
    PreTrainedTokenizerFast (its alias), beside a tokenizer.json, with no custom code, and
    transformers registers no tokenizer class of its own for the model type nor overrides the
    folder's choice for it: Llama 3's and most recent checkpoints' case."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            tokenizer_config = json.load(f)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model_config = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(tokenizer_config, dict) or not isinstance(model_config, dict)
            or tokenizer_config.get("tokenizer_class") not in _BACKEND_NAMES
            or "auto_map" in tokenizer_config or "auto_map" in model_config
            or not os.path.isfile(os.path.join(folder, "tokenizer.json"))):
        return None
    tables = auto_tokenizer_tables()
    if tables is None:  # transformers 4, or a layout we do not know: AutoTokenizer's own rules
        return None
    model_type = model_config.get("model_type")
    if (model_type in tables.models_with_incorrect_hub_class
            or tables.class_for_model_type.get(model_type) not in (None, *_BACKEND_NAMES)):
        return None
    try:
        from transformers import TokenizersBackend
    except ImportError:  # transformers 4
        return None
    return TokenizersBackend


def load_tokenizer(model_path: str, parts: Optional[list[tuple[str, float]]] = None):
    """The tokenizer `load_model_and_tokenizer(model_path)` would return; `parts` as
    `load_folder_tokenizer` fills it (a GGUF file's load adds none)."""
    if os.path.isdir(model_path):
        return load_folder_tokenizer(model_path, parts)
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


def special_token_id(folder: str, name: str) -> Optional[int]:
    """The id of the tokenizer's `name` token ("eos_token", ...) read from the folder's files
    without building the tokenizer (which takes seconds for a 128k vocabulary): the token's text
    from tokenizer_config.json, its id from the config's added_tokens_decoder or from
    tokenizer.json's added tokens (parsed alone: the 9 MB vocabulary after them is not). None where
    the files do not say; the loaded tokenizer's `<name>_id` is then the answer."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        token = config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and entry.get("content") == token:
                return int(token_id)
        return _added_token_id(os.path.join(folder, "tokenizer.json"), token)
    except (OSError, ValueError, TypeError):
        return None


def _added_token_id(path: str, token: str) -> Optional[int]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    key = text.find('"added_tokens"')
    if key < 0:
        return None
    start = text.index("[", key)
    entries, _ = json.JSONDecoder().raw_decode(text, start)
    return next((int(e["id"]) for e in entries if isinstance(e, dict) and e.get("content") == token), None)
