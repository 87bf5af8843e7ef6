"""Weight loading: Hugging Face folders (safetensors) and GGUF files -> a ready model + tokenizer.

The names below are imported on first use: `rtpllm.loader.tokenizer_loader` (what the server
needs) then costs no torch import.
"""

__all__ = ["LoadedModel", "build_model", "load_model_and_tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        from rtpllm.loader import model_loader

        return getattr(model_loader, name)
    raise AttributeError(f"module 'rtpllm.loader' has no attribute {name!r}")
