"""rtp-llm: a high-performance LLM inference engine.

    from rtpllm import LLM, SamplingParams
    llm = LLM(model="path/to/hf-folder-or.gguf")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""


import sys


class _NativeDependencies:
    """rtpllm._C links UCX (the KV transfer engine) from the libucx wheel, whose libraries are not
    on the loader's path: they must be loaded first, as the wheel intends (libucx.load_library).
    That takes 0.4 s, which the processes that never import _C (the HTTP server beside its engine
    process, the router, the CLI before it launches the engine) need not pay: this import hook
    loads them when rtpllm._C is first imported, however it is imported, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "rtpllm._C":
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            try:
                import libucx
            except ImportError:
                return None
            libucx.load_library()
        return None  # the usual finders import the module


sys.meta_path.insert(0, _NativeDependencies())

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
