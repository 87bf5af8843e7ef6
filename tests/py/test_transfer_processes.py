"""The transfer engine between processes over UCX on TCP loopback: bytes arrive intact across block
sizes, and a peer killed mid-transfer is an error within the timeout, never a hang, after which
the survivor's state is clean (it serves the next peer)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from rtpllm import _C  # noqa: E402
from transfer_peer import TIMEOUT_S, HostPool, make_engine  # noqa: E402

pytestmark = pytest.mark.skipif(not _C.has_ucx, reason="rtpllm._C built without UCX")

PEER = os.path.join(os.path.dirname(__file__), "transfer_peer.py")


class Peer:
    """A transfer_peer.py process; its JSON lines are read on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, PEER, *args], stdout=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(json.loads(line))
                self._cv.notify_all()

    def wait_line(self, predicate, timeout: float = 20.0) -> dict:
        with self._cv:
            assert self._cv.wait_for(lambda: any(predicate(x) for x in self.lines), timeout), self.lines
            return next(x for x in self.lines if predicate(x))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def test_put_and_get_between_processes_with_different_block_sizes():
    with Peer("serve", "--block-size", "4", "--num-blocks", "40") as decode:
        port = decode.wait_line(lambda x: "port" in x)["port"]
        pool = HostPool(8, 16)
        engine = make_engine("prefill")
        engine.register_kv(pool.layout)
        peer = engine.connect("127.0.0.1", port)
        src, dst = [6, 1, 3, 4], [0, 39, 5, 17, 22, 8, 9, 10, 11, 30, 2, 3, 33]  # 51 tokens
        pool.fill(src, 51, seed=11)
        for layer in range(3):  # layer by layer, as prefill pushes
            request = _C.TransferRequest(request_id=5, local_blocks=src, remote_blocks=dst, num_tokens=51, layer=layer)
            status = engine.wait(engine.put(peer, request), 10.0)
            assert status.state == _C.TransferState.DONE, status.error
        last = decode.wait_line(lambda x: x.get("layer") == 2)
        assert (last["request_id"], last["blocks"], last["num_tokens"]) == (5, dst, 51)
        # Every layer has landed: the receiver's digest of the sequence equals ours.
        assert last["digest"] == hashlib.sha256(pool.tokens(src, 51).tobytes()).hexdigest()
        back = [0, 2, 7, 5]
        status = engine.wait(engine.get(peer, _C.TransferRequest(request_id=6, local_blocks=back, remote_blocks=dst,
                                                                 num_tokens=51)), 10.0)
        assert status.state == _C.TransferState.DONE, status.error
        np.testing.assert_array_equal(pool.tokens(back, 51), pool.tokens(src, 51))


def test_receiver_killed_mid_transfer_fails_the_put_within_the_timeout():
    pool = HostPool(512, 16)  # ~7 MiB per full put: many puts are in flight when the kill lands
    blocks = list(range(512))
    pool.fill(blocks[:4], 64, seed=2)
    engine = make_engine("prefill")
    engine.register_kv(pool.layout)
    with Peer("serve", "--block-size", "16", "--num-blocks", "512") as decode:
        peer = engine.connect("127.0.0.1", decode.wait_line(lambda x: "port" in x)["port"])
        outcome: dict = {}

        def push_until_error() -> None:
            while True:
                try:
                    handle = engine.put(peer, _C.TransferRequest(request_id=1, local_blocks=blocks, remote_blocks=blocks))
                except RuntimeError as error:  # the peer was already declared dead
                    outcome.update(error=str(error), at=time.monotonic())
                    return
                status = engine.wait(handle, 3 * TIMEOUT_S)
                if status.state != _C.TransferState.DONE:
                    outcome.update(state=status.state, error=status.error, at=time.monotonic())
                    return

        pusher = threading.Thread(target=push_until_error)
        pusher.start()
        decode.wait_line(lambda x: "request_id" in x)  # at least one put landed
        killed_at = time.monotonic()
        decode.kill()
        pusher.join(3 * TIMEOUT_S + 5)
        assert not pusher.is_alive(), "the put never ended after its peer was killed"
    assert outcome["at"] - killed_at < TIMEOUT_S + 1.0, outcome
    assert outcome.get("state", _C.TransferState.FAILED) == _C.TransferState.FAILED
    (info,) = engine.peers()
    assert info.state == _C.PeerState.FAILED and info.error
    assert engine.stats().peers_failed == 1

    # Clean state: the same engine serves a new decode peer.
    with Peer("serve", "--block-size", "16", "--num-blocks", "512") as decode:
        peer = engine.connect("127.0.0.1", decode.wait_line(lambda x: "port" in x)["port"])
        status = engine.wait(engine.put(peer, _C.TransferRequest(request_id=2, local_blocks=[0, 1], remote_blocks=[3, 4])), 10.0)
        assert status.state == _C.TransferState.DONE, status.error
        assert decode.wait_line(lambda x: x.get("request_id") == 2)["digest"]


def test_sender_killed_mid_transfer_is_a_failed_peer_on_the_receiver():
    pool = HostPool(512, 16)
    engine = make_engine("decode")
    engine.register_kv(pool.layout)
    with Peer("push", "--port", str(engine.listen_port), "--block-size", "16", "--num-blocks", "512") as prefill:
        assert engine.take_notices(20.0), "no put arrived from the pusher"
        # Over TCP both sides move bytes by messages: the receiver answers nothing inside UCX, so
        # the sender's death cannot abort it (UCX's emulated RMA could).
        assert engine.peers()[0].data_path == _C.DataPath.MESSAGES
        killed_at = time.monotonic()
        prefill.kill()
        while time.monotonic() - killed_at < TIMEOUT_S + 1.0:
            if engine.peers()[0].state == _C.PeerState.FAILED:
                break
            time.sleep(0.01)
        assert engine.peers()[0].state == _C.PeerState.FAILED, engine.peers()[0].error
    engine.take_notices(0)
    # A new sender connects and its puts land.
    with Peer("push", "--port", str(engine.listen_port), "--block-size", "16", "--num-blocks", "8"):
        notices = engine.take_notices(20.0)
        assert notices and notices[0].peer != engine.peers()[0].id
    assert len(engine.peers()) == 2


@pytest.mark.parametrize("op", ["put", "get"])
def test_peer_killed_while_the_target_is_frozen_fails_the_peer_and_the_target_lives(op):
    """Over TCP, UCX emulates RMA with messages the target answers from inside worker progress,
    and UCX 1.22 aborts the process when an answer to a dead peer fails to send (ucp_request.inl
    'unexpected error: Endpoint timeout'). Freezing the target while its peer is killed leaves the
    dead peer's messages unread until it resumes: the worst case for that abort. Over TCP the
    engine moves bytes by its own messages instead (DataPath.MESSAGES), whose target answers
    nothing inside UCX: the target lives, for gets as well as puts."""
    with Peer("serve", "--block-size", "16", "--num-blocks", "512") as target:
        port = target.wait_line(lambda x: "port" in x)["port"]
        with Peer("push", "--port", str(port), "--op", op, "--block-size", "16", "--num-blocks", "512") as pusher:
            pusher.wait_line(lambda x: "done" in x)  # transfers flow
            target.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # the pusher fills the sockets while the target is frozen
            pusher.kill()
            target.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + TIMEOUT_S + 2.0
        while time.monotonic() < deadline and target.proc.poll() is None:
            if any("failed_peer" in x for x in target.lines):
                break
            time.sleep(0.02)
        assert target.proc.poll() is None, f"the target died (exit status {target.proc.returncode})"
        failed = target.wait_line(lambda x: "failed_peer" in x, timeout=0.1)
        assert failed["failed_peer"] == "prefill" and failed["error"], failed
