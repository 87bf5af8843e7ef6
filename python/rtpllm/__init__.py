"""rtp-llm: a high-performance LLM inference engine.

    from rtpllm import LLM, SamplingParams
    llm = LLM(model="path/to/hf-folder-or.gguf")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from rtpllm.config import EngineConfig
from rtpllm.outputs import CompletionOutput, RequestOutput
from rtpllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]


def __getattr__(name: str):
    # The engine pulls in torch and the compiled runtime; import it only when asked.
    if name == "LLM":
        from rtpllm.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'rtpllm' has no attribute {name!r}")
