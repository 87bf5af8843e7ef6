"""rtp-llm: a high-performance LLM inference engine.

    from rtpllm import LLM, SamplingParams
    llm = LLM(model="path/to/hf-folder-or.gguf")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""


def _load_native_dependencies() -> None:
    # rtpllm._C links UCX (the KV transfer engine) from the libucx wheel, whose libraries are not on
    # the loader's path: load them first, as the wheel intends (libucx.load_library).
    try:
        import libucx
    except ImportError:
        return
    libucx.load_library()


_load_native_dependencies()

from rtpllm.config import EngineConfig  # noqa: E402
from rtpllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from rtpllm.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]


def __getattr__(name: str):
    # The engine pulls in torch and the compiled runtime; import it only when asked.
    if name == "LLM":
        from rtpllm.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'rtpllm' has no attribute {name!r}")
