"""A KV transfer peer in a process of its own, for tests/py/test_transfer_processes.py.

    python tests/py/transfer_peer.py serve --block-size 4   # prints {"port": P}, then one line per notice
    python tests/py/transfer_peer.py push --port P          # puts into P's blocks in a loop, one line per put
                                                            # (--op get: gets them instead); serve also prints
                                                            # {"failed_peer": ...} when a peer fails

Each peer owns a host KV pool shaped as the engine allocates it ([2, num_blocks, block_size, heads,
head_dim] per layer) and reports digests of the tokens it holds, so the test compares bytes across
processes without shipping them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from rtpllm import _C  # noqa: E402

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 3, 2, 24
TIMEOUT_S = 2.0


class HostPool:
    """Paged KV pool in host memory: one uint8 array per layer, [2, num_blocks, block_size, heads, head_dim * 2]."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [np.zeros((2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM * 2), np.uint8) for _ in range(NUM_LAYERS)]
        block_bytes = block_size * NUM_KV_HEADS * HEAD_DIM * 2
        self.layout = _C.KVLayout(
            memory=_C.MemoryKind.HOST, num_blocks=num_blocks, block_size=block_size, num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM, element_bytes=2, block_stride_bytes=block_bytes,
            layers=[_C.KVLayerAddress(a.ctypes.data, a.ctypes.data + a[0].nbytes) for a in self.layers])

    def tokens(self, blocks: list[int], num_tokens: int) -> np.ndarray:
        """[layers, 2, num_tokens, ...] copy of the sequence stored in `blocks`."""
        per_layer = []
        for a in self.layers:
            seq = a[:, blocks].reshape(2, len(blocks) * self.block_size, *a.shape[3:])
            per_layer.append(seq[:, :num_tokens])
        return np.stack(per_layer)

    def fill(self, blocks: list[int], num_tokens: int, seed: int) -> None:
        values = np.random.default_rng(seed).integers(1, 256, (NUM_LAYERS, 2, num_tokens, NUM_KV_HEADS, HEAD_DIM * 2), np.uint8)
        for layer, a in enumerate(self.layers):
            for t in range(num_tokens):
                a[:, blocks[t // self.block_size], t % self.block_size] = values[layer, :, t]

    def digest(self, blocks: list[int], num_tokens: int) -> str:
        return hashlib.sha256(self.tokens(blocks, num_tokens).tobytes()).hexdigest()


def make_engine(name: str) -> "_C.UcxTransfer":
    return _C.UcxTransfer(_C.TransferOptions(name=name, identity="test-model|fp16", timeout_s=TIMEOUT_S))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def serve(block_size: int, num_blocks: int) -> None:
    pool = HostPool(num_blocks, block_size)
    engine = make_engine("decode")
    engine.register_kv(pool.layout)
    emit(port=engine.listen_port)
    failed: set[int] = set()
    while True:  # until killed
        for n in engine.take_notices(0.2):
            emit(request_id=n.request_id, layer=n.layer, blocks=list(n.blocks), num_tokens=n.num_tokens,
                 digest=pool.digest(list(n.blocks), n.num_tokens))
        for info in engine.peers():
            if info.state == _C.PeerState.FAILED and info.id not in failed:
                failed.add(info.id)
                emit(failed_peer=info.name, error=info.error)


def push(port: int, block_size: int, num_blocks: int, op: str) -> None:
    pool = HostPool(num_blocks, block_size)
    blocks = list(range(num_blocks))
    pool.fill(blocks, num_blocks * block_size, seed=1)
    engine = make_engine("prefill")
    engine.register_kv(pool.layout)
    peer = engine.connect("127.0.0.1", port)
    request_id = 0
    while True:  # until killed
        request_id += 1
        submit = engine.put if op == "put" else engine.get
        status = engine.wait(submit(peer, _C.TransferRequest(request_id=request_id, local_blocks=blocks,
                                                             remote_blocks=blocks)), 2 * TIMEOUT_S)
        emit(done=request_id, state=str(status.state), error=status.error)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve", "push"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--op", choices=["put", "get"], default="put", help="push: what it repeats")
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.block_size, args.num_blocks)
    else:
        push(args.port, args.block_size, args.num_blocks, args.op)


if __name__ == "__main__":
    sys.exit(main())
