"""Safetensors weights through the C++ pipelined reader (`rtpllm._C.loader`).

The model says where each checkpoint tensor goes (`weight_destination`: a parameter, or its rows
of a fused qkv / gate_up parameter); this module turns that into byte requests (file, tensor,
destination pointer, size) and lets the reader move the bytes: several threads read the files
in file order with large aligned reads into a ring of staging buffers, and a sink copies each
chunk straight into the parameters' storage (memcpy on the CPU, cudaMemcpyAsync on a stream of
its own on a GPU, overlapped with the reads).

Where the checkpoint's dtype differs from the model's, the raw bytes land in a staging tensor on
the model's device and are converted there, a bounded batch at a time.

Tensor parallelism asks for slices with the same requests: a row slice is a byte range
(`begin`, `row_bytes`), a column slice a strided request (`rows`, `src_stride`, `dst_stride`);
see cpp/rtpllm/loader/tensor_request.h.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from rtpllm import _C
from rtpllm.distributed.partition import TensorShard
from rtpllm.loader.reader import LoaderSettings, Progress, make_loader, run_requests

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Staging for dtype conversion is converted and freed in batches of about this many bytes.
_CONVERSION_BATCH_BYTES = 1 << 30


@dataclass(frozen=True)
class CheckpointTensor:
    file: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class SafetensorsCheckpoint:
    """The tensors of a set of safetensors files (headers read and validated in C++), in file order.

    Raises FileNotFoundError / ValueError naming the file and the tensor for a missing file, a
    header that lies (offsets past the end, sizes that do not match the shape, overlaps), a tensor
    stored twice, or an index (`weight_map`) that places a tensor in a file that lacks it.
    """

    def __init__(self, files: list[str], weight_map: Optional[dict[str, str]] = None):
        self.files = list(files)
        self.tensors: list[CheckpointTensor] = []
        where: dict[str, str] = {}
        for path in self.files:
            for info in _read_header(path).tensors:
                if info.name in where:
                    raise ValueError(f"{os.path.basename(path)}: tensor {info.name} is also stored in "
                                     f"{os.path.basename(where[info.name])}")
                if info.dtype not in _TORCH_DTYPES:
                    raise ValueError(f"{os.path.basename(path)}: tensor {info.name} has dtype {info.dtype}, "
                                     "which torch cannot hold")
                where[info.name] = path
                self.tensors.append(CheckpointTensor(path, info.name, _TORCH_DTYPES[info.dtype],
                                                     tuple(info.shape), info.nbytes))
        for name, shard in (weight_map or {}).items():
            if name not in where:
                raise ValueError(f"model.safetensors.index.json: tensor {name} is listed in {shard}, "
                                 "which does not contain it")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _read_header(path: str):
    try:
        return _C.loader.read_safetensors_header(path)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise ValueError(f"{os.path.basename(path)}: not a valid safetensors file ({e})") from None


@dataclass
class _Transfer:
    tensor: CheckpointTensor
    destination: torch.Tensor  # the model's storage for it
    shard: Optional[TensorShard] = None  # the rows this rank holds along shard.dim (None: all of it)
    staging: Optional[torch.Tensor] = None  # raw bytes on the device when dtype or layout differ

    @property
    def nbytes(self) -> int:
        """Bytes the transfer reads: the whole tensor, or the shard's slice of it."""
        if self.shard is None:
            return self.tensor.nbytes
        return self.tensor.nbytes // self.shard.full * self.shard.length


def load_into_model(checkpoint: SafetensorsCheckpoint,
                    destination_of: Callable[[str], Optional[torch.Tensor]],
                    settings: LoaderSettings = LoaderSettings(),
                    shard_of: Optional[Callable[[str], Optional[TensorShard]]] = None) -> set[str]:
    """Loads every checkpoint tensor that `destination_of(name)` places (None: skip it) into that
    tensor's storage; returns the names loaded. Under tensor parallelism `shard_of(name)` names the
    slice this rank holds (None: the whole tensor): only its bytes are read, a row slice as one
    range, a column slice as one strided request; a padded vocabulary shard's extra rows are zeroed.
    Raises ValueError naming the file and the tensor for a shape mismatch, before any byte is read."""
    transfers = []
    for tensor in checkpoint.tensors:
        destination = destination_of(tensor.name)
        if destination is None:
            continue
        shard = shard_of(tensor.name) if shard_of is not None else None
        expected = list(tensor.shape)
        if shard is not None:
            if shard.dim >= len(expected) or expected[shard.dim] != shard.full:
                raise ValueError(f"{tensor.name}: checkpoint shape {tensor.shape} cannot hold rows {shard.start}.."
                                 f"{shard.stop} of {shard.full} along dim {shard.dim} "
                                 f"(in {os.path.basename(tensor.file)})")
            expected[shard.dim] = shard.size
        if tuple(destination.shape) != tuple(expected):
            raise ValueError(f"{tensor.name}: checkpoint shape {tensor.shape} does not match the model's "
                             f"{tuple(destination.shape)} (in {os.path.basename(tensor.file)})")
        transfers.append(_Transfer(tensor, destination, shard))
    devices = {t.destination.device for t in transfers}
    if len(devices) > 1:
        raise ValueError(f"destinations: all on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    loader = make_loader(device, settings)
    start = time.perf_counter()
    direct = [t for t in transfers if _is_direct(t)]
    converted = [t for t in transfers if not _is_direct(t)]
    batches = _conversion_batches(converted)
    total = checkpoint_bytes = sum(t.nbytes for t in transfers)
    with Progress(total, settings.progress) as progress:
        # The first job also carries every tensor that needs no conversion.
        for index, batch in enumerate(batches or [[]]):
            jobs = (direct if index == 0 else []) + batch
            for transfer in batch:
                # Raw bytes in the checkpoint's dtype, laid out as the destination (the shard's rows).
                staged = torch.empty(transfer.destination.shape, dtype=transfer.tensor.dtype, device=device)
                transfer.staging = staged.view(-1).view(torch.uint8)
            for transfer in jobs:
                _zero_padding(transfer)
            run_requests(loader, [_request(t) for t in jobs], progress)
            for transfer in batch:
                raw = transfer.staging.view(transfer.tensor.dtype).view(transfer.destination.shape)
                transfer.destination.copy_(raw)
                transfer.staging = None
    seconds = time.perf_counter() - start
    logger.info("loaded %d tensors, %.2f GB, in %.2f s (%.2f GB/s, %d files)", len(transfers),
                checkpoint_bytes / 1e9, seconds, checkpoint_bytes / 1e9 / max(seconds, 1e-9), len(checkpoint.files))
    return {t.tensor.name for t in transfers}


def _zero_padding(transfer: _Transfer) -> None:
    """A padded vocabulary shard holds more rows than the checkpoint has: those stay zeros."""
    shard = transfer.shard
    if shard is None or shard.size == shard.length:
        return
    target = transfer.destination
    if transfer.staging is not None:
        target = transfer.staging.view(transfer.tensor.dtype).view(transfer.destination.shape)
    target.narrow(shard.dim, shard.length, shard.size - shard.length).zero_()


def _is_direct(transfer: _Transfer) -> bool:
    return (transfer.destination.dtype == transfer.tensor.dtype and transfer.destination.is_contiguous())


def _conversion_batches(transfers: list[_Transfer]) -> list[list[_Transfer]]:
    batches: list[list[_Transfer]] = []
    size = 0
    for transfer in transfers:
        if not batches or size + transfer.tensor.nbytes > _CONVERSION_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(transfer)
        size += transfer.tensor.nbytes
    return batches


def _request(transfer: _Transfer):
    target = transfer.staging if transfer.staging is not None else transfer.destination
    nbytes = target.numel() * target.element_size()
    tensor, shard = transfer.tensor, transfer.shard
    if shard is None:
        return _C.loader.TensorRequest(tensor.file, tensor.name, target.data_ptr(), nbytes)
    # Bytes of one step along the shard's dim, and how many such slabs precede it (rows of a column slice).
    slab = tensor.nbytes // math.prod(tensor.shape[:shard.dim + 1])
    outer = math.prod(tensor.shape[:shard.dim])
    if outer == 1:  # a row slice: one contiguous range
        return _C.loader.TensorRequest(tensor.file, tensor.name, target.data_ptr(), nbytes, begin=shard.start * slab,
                                       row_bytes=shard.length * slab)
    return _C.loader.TensorRequest(tensor.file, tensor.name, target.data_ptr(), nbytes, begin=shard.start * slab,
                                   row_bytes=shard.length * slab, rows=outer, src_stride=shard.full * slab,
                                   dst_stride=shard.size * slab)


def read_tensors(files: Iterable[str], names: Optional[Iterable[str]] = None,
                 device: torch.device | str = "cpu", settings: LoaderSettings = LoaderSettings()
                 ) -> dict[str, torch.Tensor]:
    """Every tensor (or the ones in `names`) of the files, in their stored dtype and shape, on
    `device`. For tools and tests; models load through `load_into_model`."""
    checkpoint = SafetensorsCheckpoint(list(files))
    wanted = None if names is None else set(names)
    device = torch.device(device)
    out = {t.name: torch.empty(t.shape, dtype=t.dtype, device=device)
           for t in checkpoint.tensors if wanted is None or t.name in wanted}
    if wanted is not None and wanted - out.keys():
        raise ValueError(f"tensors not in the checkpoint: {sorted(wanted - out.keys())}")
    load_into_model(checkpoint, out.get, settings)
    return out
