"""GPU tests: run on a machine with a CUDA device and rtpllm built with RTPLLM_CUDA=1
(`bash bench/gpu/run_all.sh` does both). Everywhere else they are skipped, never failed."""

import pytest
import torch


def _cuda_kernels_missing() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from rtpllm import _C
    except ImportError as exc:
        return f"rtpllm._C is not built ({exc})"
    if not getattr(_C, "has_cuda", False):
        return "rtpllm._C was built without RTPLLM_CUDA=1"
    return ""


def pytest_collection_modifyitems(config, items):
    reason = _cuda_kernels_missing()
    here = str(config.rootpath / "tests" / "gpu")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
