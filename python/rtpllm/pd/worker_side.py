"""Prefill-decode disaggregation on a tensor-parallel rank > 0 (a worker process).

Rank 0 keeps all the PD logic (engine_side.py: reservations, notices, the first token); a worker
only moves its own KV heads, as rank 0 tells it (engine/link/messages.py):
    decode worker:  its transfer engine listens (the port goes to rank 0 in WorkerReady, and from
                    there into the KVDestination); WorkerPDGrant / WorkerPDRevoke mirror rank 0's
                    write grants (a grant is acknowledged before the reservation goes out, so a
                    prefill never finds it missing);
    prefill worker: WorkerPDPush lists this rank's writes (which heads into which decode rank,
                    pd/head_map.py); a ShardWriter (pd/shard_writer.py) does them from a thread of
                    its own: layer by layer during the next forward (by_layer: the message came
                    before the step that computes the prompt's last chunk; the model's layer hook
                    hands each layer over as it is computed), else every layer in one put each.
                    WorkerPDPushed answers once they are DONE (remote completion) or one FAILED.
                    Rank 0 sends the last layer's notice (with the first token) only after every
                    worker answered DONE, so decode rank 0's notices mean every rank's heads landed.
"""

from __future__ import annotations

import os
from typing import Callable

from rtpllm.engine.link.messages import LinkMessage, WorkerPDAck, WorkerPDGrant, WorkerPDPush, WorkerPDPushed
from rtpllm.pd.shard_writer import ShardWriter


class WorkerPD:
    def __init__(self, config, runner, arch, model_path: str, dtype, rank: int,
                 send: Callable[[LinkMessage], None]):
        from rtpllm import _C
        from rtpllm.engine.kv_tiers import kv_layout
        from rtpllm.pd.engine_side import pd_identity_of

        pd = config.pd
        caches = runner.kv_caches
        cuda = caches[0].device.type == "cuda"
        if not cuda:
            os.environ.setdefault("UCX_TLS", "tcp")  # host memory between processes: TCP works everywhere
        self.role, self.rank, self._send = pd.role, rank, send
        port = pd.pd_transfer_port + rank if pd.pd_transfer_port and pd.role == "decode" else 0
        self.transfer = _C.UcxTransfer(
            _C.TransferOptions(name=f"rtpllm-{pd.role}-rank{rank}", identity=pd_identity_of(model_path, dtype, arch),
                               listen_host=pd.pd_transfer_host, listen_port=port, timeout_s=pd.pd_timeout_s,
                               require_write_grants=pd.role == "decode"),
            cuda_device=caches[0].device.index or 0 if cuda else None, direct_access=cuda and pd.pd_direct_copy)
        self.transfer.register_kv(kv_layout(caches, runner.block_size))
        self._caches = caches  # registered memory: kept alive as long as the transfer engine
        self._model = runner.model
        self._writer = None
        if pd.role == "prefill":
            first = caches[0]
            self._writer = ShardWriter(self.transfer, rank=rank, timeout_s=pd.pd_timeout_s, cuda=cuda,
                                       head_token_layer_bytes=2 * first.shape[4] * first.element_size(),
                                       num_layers=len(caches),
                                       on_done=lambda tid, error, moved: send(WorkerPDPushed(rank, tid, error, moved)))

    @property
    def port(self) -> int:
        return self.transfer.listen_port if self.role == "decode" else 0

    def handle(self, message) -> None:
        """One PD command from rank 0 (the worker's loop, between steps)."""
        if isinstance(message, WorkerPDGrant):
            self.transfer.grant_writes(message.transfer_id, list(message.blocks))
            self._send(WorkerPDAck(self.rank, message.transfer_id))
        elif isinstance(message, WorkerPDPush) and message.by_layer:
            self._writer.arm(message.transfer_id, message.writes, message.local_blocks, message.remote_blocks,
                             message.num_tokens)
            self._model.layer_hook = self._on_layer  # the coming forward (its step follows this message)
        elif isinstance(message, WorkerPDPush):
            # The step that computed the prompt is queued before this: the writer waits for it.
            self._writer.submit(message.transfer_id, message.writes, message.local_blocks, message.remote_blocks,
                                message.num_tokens)
        else:
            self.transfer.revoke_writes(message.transfer_id)

    def _on_layer(self, layer: int) -> None:
        self._writer.on_layer(layer)
        if not self._writer.armed:  # the last layer: the forward's writes are all issued
            self._model.layer_hook = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
