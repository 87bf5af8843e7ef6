"""The C++ pipelined reader (`rtpllm._C.loader`) as the Python loaders use it: one WeightLoader per
load with the right sink for the destination device, jobs run with a progress bar, and raw byte
ranges of any file (GGUF) read into device tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from rtpllm import _C

# The progress bar appears only for loads that run longer than this (seconds).
_PROGRESS_DELAY_S = 2.0


@dataclass(frozen=True)
class LoaderSettings:
    """Knobs of the C++ reader; the defaults suit NVMe disks and the page cache alike."""

    num_threads: int = 8
    chunk_bytes: int = 16 << 20
    buffers_per_thread: int = 2
    direct_io: str = "auto"  # auto (per file: O_DIRECT unless mostly cached), always, never
    progress: bool = True


def make_loader(device: torch.device, settings: LoaderSettings):
    cuda_device = None
    if device.type == "cuda":
        if not getattr(_C, "has_cuda", False):
            raise ValueError("device: loading onto a GPU needs rtpllm built with RTPLLM_CUDA=1")
        cuda_device = device.index if device.index is not None else torch.cuda.current_device()
        # The reader copies on a stream of its own: nothing queued on torch's may touch the parameters.
        torch.cuda.current_stream(device).synchronize()
    elif device.type != "cpu":
        raise ValueError(f"device: the safetensors loader supports cpu and cuda, got {device}")
    return _C.loader.WeightLoader(num_threads=settings.num_threads, chunk_bytes=settings.chunk_bytes,
                                  buffers_per_thread=settings.buffers_per_thread, direct_io=settings.direct_io,
                                  cuda_device=cuda_device)


def run_requests(loader, requests: list, progress: "Progress") -> None:
    """Runs one job of the reader, advancing `progress` as its bytes land; raises its first error."""
    if not requests:
        return
    job = loader.start(requests)
    done_before = progress.done
    while not job.wait_for(0.1):
        progress.update_to(done_before + job.bytes_done)
    job.finish()
    progress.update_to(done_before + job.total_bytes)


class Progress:
    """A tqdm bar in bytes (with its GB/s rate) that shows up only when a load takes a while."""

    def __init__(self, total: int, enabled: bool):
        self.done = 0
        self._bar = None
        if enabled and total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="Loading weights",
                             delay=_PROGRESS_DELAY_S, leave=False, dynamic_ncols=True)

    def update_to(self, done: int) -> None:
        if self._bar is not None and done > self.done:
            self._bar.update(done - self.done)
        self.done = max(self.done, done)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def read_file_ranges(path: str, ranges: Sequence[tuple[int, int]], device: Union[str, torch.device],
                     settings: LoaderSettings = LoaderSettings()) -> list[torch.Tensor]:
    """The bytes [offset, offset + size) of `path` for each (offset, size), as uint8 tensors on
    `device`. Raises ValueError naming the file for a range past its end."""
    device = torch.device(device)
    out = [torch.empty(size, dtype=torch.uint8, device=device) for _, size in ranges]
    requests = [_C.loader.TensorRequest(path, "", t.data_ptr(), size, begin=offset)
                for (offset, size), t in zip(ranges, out)]
    with Progress(sum(size for _, size in ranges), settings.progress) as progress:
        run_requests(make_loader(device, settings), requests, progress)
    return out
