"""What the server process imports before it launches its engine process delays the engine: the
UCX libraries that rtpllm._C links (0.4 s to load) wait until something imports rtpllm._C (the
server's HTTP stack does, once the engine process is loading)."""

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("libucx") is None, reason="the libucx wheel is not installed")
def test_ucx_loads_only_when_the_native_module_is_imported():
    code = ("import sys, rtpllm.serving.cli, rtpllm.engine.link.process_engine; print('libucx' in sys.modules); "
            "import rtpllm._C; print('libucx' in sys.modules, hasattr(rtpllm._C, 'loader')); "
            "print(any(type(f).__name__ == '_NativeDependencies' for f in sys.meta_path))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True", "False"]  # the hook removed itself once done


def test_the_native_module_imports_in_each_way_the_code_base_uses():
    for statement in ("from rtpllm import _C", "import rtpllm._C as _C", "_C = __import__('rtpllm._C')._C"):
        code = f"{statement}; print(_C.__name__)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "rtpllm._C", statement
