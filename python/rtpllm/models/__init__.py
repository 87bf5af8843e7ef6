"""Model definitions: the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) in one definition."""

from rtpllm.models.llama import LlamaForCausalLM
from rtpllm.models.llama_arch import SUPPORTED_ARCHITECTURES, LlamaArch

__all__ = ["LlamaArch", "LlamaForCausalLM", "SUPPORTED_ARCHITECTURES"]
