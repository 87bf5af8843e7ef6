"""Weight loading: Hugging Face folders (safetensors) and GGUF files -> a ready model + tokenizer."""

from rtpllm.loader.model_loader import LoadedModel, build_model, load_model_and_tokenizer

__all__ = ["LoadedModel", "build_model", "load_model_and_tokenizer"]
