"""The KV transfer engine on GPU memory: two processes on one GPU (as prefill and decode share a
card in the one-GPU PD benchmark). With direct_access, AUTO goes DIRECT there (the sender maps the
receiver's pool over CUDA IPC and copies with its own kernel); without, UCX's CUDA IPC transport
(RMA); MESSAGES: UCX active messages (what TCP between hosts gets).

Checks bytes across block sizes (prefill 64, decode 16) for put, layer-by-layer put and get, and
prints the transfer bandwidth against a device-to-device copy of the same bytes in the same run.
Needs rtpllm._C built with RTPLLM_CUDA=1 and UCX (the libucx-cu13 wheel installed at build time).
The file doubles as the receiver's script: `python tests/gpu/test_ucx_transfer_gpu.py serve ...`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest
import torch

LAYERS, HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B's KV shape, bf16
TIMEOUT_S = 20.0


def make_pool(num_blocks: int, block_size: int, layers: int = LAYERS) -> list[torch.Tensor]:
    return [torch.zeros(2, num_blocks, block_size, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            for _ in range(layers)]


def layout_of(pool: list[torch.Tensor]):
    from rtpllm import _C

    _, num_blocks, block_size, heads, head_dim = pool[0].shape
    return _C.KVLayout(memory=_C.MemoryKind.CUDA, device_index=torch.cuda.current_device(), num_blocks=num_blocks,
                       block_size=block_size, num_kv_heads=heads, head_dim=head_dim, element_bytes=2,
                       block_stride_bytes=pool[0][0, 0].nbytes,
                       layers=[_C.KVLayerAddress(t[0].data_ptr(), t[1].data_ptr()) for t in pool])


def tokens(pool: list[torch.Tensor], blocks: list[int], num_tokens: int, layers=None) -> torch.Tensor:
    """[layers, 2, num_tokens, heads, head_dim] of the sequence held in `blocks`."""
    index = torch.tensor(blocks, device="cuda")
    chosen = [pool[i] for i in (layers if layers is not None else range(len(pool)))]
    return torch.stack([t[:, index].flatten(1, 2)[:, :num_tokens] for t in chosen])


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def make_engine(name: str, data_path: str = "AUTO", direct_access: bool = False):
    from rtpllm import _C

    return _C.UcxTransfer(_C.TransferOptions(name=name, identity="llama-8b|bf16", timeout_s=TIMEOUT_S,
                                             data_path=getattr(_C.DataPath, data_path)),
                          cuda_device=torch.cuda.current_device(), direct_access=direct_access)


def serve(num_blocks: int, block_size: int, with_digest: bool) -> None:
    """The receiver: prints its port, then a line per notice (with a digest of what landed)."""
    pool = make_pool(num_blocks, block_size)
    engine = make_engine("decode", direct_access=True)  # exports its pool: senders may go DIRECT
    engine.register_kv(layout_of(pool))
    print(json.dumps({"port": engine.listen_port}), flush=True)
    while True:  # until the parent kills it
        for n in engine.take_notices(0.2):
            line = {"request_id": n.request_id, "layer": n.layer}
            if with_digest:
                layers = None if n.layer < 0 else [n.layer]
                line["digest"] = digest(tokens(pool, list(n.blocks), n.num_tokens, layers))
            print(json.dumps(line), flush=True)


class Receiver:
    def __init__(self, num_blocks: int, block_size: int, with_digest: bool = True) -> None:
        args = ["serve", str(num_blocks), str(block_size), "digest" if with_digest else "quiet"]
        self.proc = subprocess.Popen([sys.executable, __file__, *args],
                                     stdout=subprocess.PIPE, text=True)
        self.port = self.line()["port"]

    def line(self) -> dict:
        text = self.proc.stdout.readline()
        assert text, "the receiver exited"
        return json.loads(text)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def ucx():
    from rtpllm import _C

    if not getattr(_C, "has_ucx", False):
        pytest.skip("rtpllm._C was built without UCX (pip install libucx-cu13, then rebuild)")
    return _C


@pytest.mark.parametrize("data_path,direct_access,expected", [
    ("AUTO", True, "DIRECT"), ("AUTO", False, "RMA"), ("MESSAGES", False, "MESSAGES")])
def test_put_and_get_gpu_blocks_across_block_sizes(ucx, data_path, direct_access, expected):
    """DIRECT: our kernel into the mapped pool. RMA: UCX's CUDA IPC. MESSAGES: the receiving
    engine copies each message into device memory itself."""
    receiver = Receiver(num_blocks=96, block_size=16)
    try:
        pool = make_pool(num_blocks=8, block_size=64)
        for t in pool:
            t.normal_()
        engine = make_engine("prefill", data_path, direct_access)
        engine.register_kv(layout_of(pool))
        peer = engine.connect("127.0.0.1", receiver.port)
        assert engine.peers()[0].data_path == getattr(ucx.DataPath, expected)
        src, dst, n = [5, 2, 7], [90, 3, 41, 0, 17, 64, 8, 9, 22, 77, 50, 1], 181  # 3 x 64 -> 12 x 16
        torch.cuda.synchronize()  # the pool's bytes are written before the engine reads them
        status = engine.wait(engine.put(peer, ucx.TransferRequest(request_id=1, local_blocks=src, remote_blocks=dst,
                                                                  num_tokens=n)), TIMEOUT_S)
        assert status.state == ucx.TransferState.DONE, status.error
        assert receiver.line()["digest"] == digest(tokens(pool, src, n))

        for layer in (0, 17, 31):  # layer by layer, as prefill pushes
            status = engine.wait(engine.put(peer, ucx.TransferRequest(request_id=2, local_blocks=src, remote_blocks=dst,
                                                                      num_tokens=n, layer=layer)), TIMEOUT_S)
            assert status.state == ucx.TransferState.DONE, status.error
            assert receiver.line()["digest"] == digest(tokens(pool, src, n, [layer]))

        back = [0, 1, 3]
        status = engine.wait(engine.get(peer, ucx.TransferRequest(request_id=3, local_blocks=back, remote_blocks=dst,
                                                                  num_tokens=n)), TIMEOUT_S)
        assert status.state == ucx.TransferState.DONE, status.error
        torch.testing.assert_close(tokens(pool, back, n), tokens(pool, src, n), rtol=0, atol=0)
    finally:
        receiver.close()


@pytest.mark.parametrize("data_path", ["DIRECT", "RMA"])
def test_transfer_bandwidth_against_device_copy(ucx, data_path):
    """A 4k-token prompt's KV (Llama-3.1-8B shape, 512 MiB) pushed layer by layer, as prefill does,
    into reversed blocks (one run per block): our kernel (DIRECT) against UCX's CUDA IPC (RMA)."""
    block_size, num_tokens = 16, 4096
    num_blocks = num_tokens // block_size
    receiver = Receiver(num_blocks=num_blocks, block_size=block_size, with_digest=False)
    try:
        pool = make_pool(num_blocks, block_size)
        for t in pool:
            t.normal_()
        engine = make_engine("prefill", data_path)
        engine.register_kv(layout_of(pool))
        peer = engine.connect("127.0.0.1", receiver.port)
        blocks = list(range(num_blocks))
        dst = blocks[::-1]  # not contiguous on the receiver: one copy per block
        torch.cuda.synchronize()

        def push_all_layers() -> float:
            start = time.perf_counter()
            handles = [engine.put(peer, ucx.TransferRequest(request_id=9, local_blocks=blocks, remote_blocks=dst,
                                                            layer=layer)) for layer in range(LAYERS)]
            for h in handles:
                status = engine.wait(h, TIMEOUT_S)
                assert status.state == ucx.TransferState.DONE, status.error
            return time.perf_counter() - start

        push_all_layers()  # warm-up: IPC handles opened, rkeys cached
        for _ in range(LAYERS):
            receiver.line()
        transfer_s = min(push_all_layers() for _ in range(3))

        nbytes = sum(t.nbytes for t in pool)
        copy = [torch.empty_like(t) for t in pool]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for a, b in zip(copy, pool):
            a.copy_(b)
        torch.cuda.synchronize()
        copy_s = time.perf_counter() - start
        print(f"\n{torch.cuda.get_device_name()}, {engine.peers()[0].data_path.name}: {nbytes / 2**20:.0f} MiB in "
              f"{LAYERS} layer puts: "
              f"{nbytes / transfer_s / 1e9:.1f} GB/s ({transfer_s * 1e3:.2f} ms); device copy "
              f"{nbytes / copy_s / 1e9:.1f} GB/s ({copy_s * 1e3:.2f} ms); ratio {copy_s / transfer_s:.2f}")
        assert transfer_s < 10 * TIMEOUT_S
    finally:
        receiver.close()


@pytest.mark.parametrize("heads,head_dim,slice_", [(4, 5, None), (4, 5, (1, 2, 2)), (8, 128, None), (8, 128, (3, 0, 4))])
def test_direct_copy_kernel_against_indexing(ucx, heads, head_dim, slice_):
    """DIRECT between two engines of one process (the export is the address itself: the copy
    kernel without CUDA IPC), bytes compared with torch indexing: odd token sizes (4 heads x 5 x
    bf16 = 40 bytes, byte-wise pieces), head slices ((src offset, dst offset, count)), long runs
    split into 256 KiB pieces (consecutive 128-dim blocks) and random block orders."""
    import random

    def pool(num_blocks, block_size, n_heads):
        return [torch.randn(2, num_blocks, block_size, n_heads, head_dim, device="cuda").to(torch.bfloat16)
                for _ in range(3)]

    def layout(p):
        _, num_blocks, block_size, n_heads, _ = p[0].shape
        return ucx.KVLayout(memory=ucx.MemoryKind.CUDA, device_index=torch.cuda.current_device(),
                            num_blocks=num_blocks, block_size=block_size, num_kv_heads=n_heads, head_dim=head_dim,
                            element_bytes=2, block_stride_bytes=p[0][0, 0].nbytes,
                            layers=[ucx.KVLayerAddress(t[0].data_ptr(), t[1].data_ptr()) for t in p])

    src_offset, dst_offset, count = slice_ or (0, 0, heads)
    src_pool, dst_pool = pool(40, 32, heads), pool(300, 16, heads if slice_ is None else count + dst_offset)
    sender, receiver = make_engine("prefill", "DIRECT"), make_engine("decode", direct_access=True)
    sender.register_kv(layout(src_pool))
    receiver.register_kv(layout(dst_pool))
    peer = sender.connect("127.0.0.1", receiver.listen_port)
    assert sender.peers()[0].data_path == ucx.DataPath.DIRECT
    rng = random.Random(heads * head_dim)
    n = 1000 if slice_ is None else 333
    if head_dim == 128:  # consecutive on both sides: one 2 MB run per plane and layer, cut into pieces
        src, dst = list(range(3, 3 + -(-n // 32))), list(range(10, 10 + -(-n // 16)))
    else:
        src, dst = rng.sample(range(40), -(-n // 32)), rng.sample(range(300), -(-n // 16))
    sliced = {} if slice_ is None else dict(num_heads=count, local_head_offset=src_offset, remote_head_offset=dst_offset)
    request = ucx.TransferRequest(request_id=1, local_blocks=src, remote_blocks=dst, num_tokens=n, **sliced)
    torch.cuda.synchronize()
    status = sender.wait(sender.put(peer, request), TIMEOUT_S)
    assert status.state == ucx.TransferState.DONE, status.error
    assert [n_.request_id for n_ in receiver.take_notices(TIMEOUT_S)] == [1]
    got = tokens(dst_pool, dst, n)[:, :, :, dst_offset:dst_offset + count]
    torch.testing.assert_close(got, tokens(src_pool, src, n)[:, :, :, src_offset:src_offset + count], rtol=0, atol=0)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "digest")
