"""The transfer engine's bindings in one process: typed objects, errors naming the bad field, the
block-size plan, and a put/get between two engines over TCP loopback."""

import os
import select
import time

import numpy as np
import pytest

os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from rtpllm import _C  # noqa: E402
from transfer_peer import HostPool, make_engine  # noqa: E402

pytestmark = pytest.mark.skipif(not _C.has_ucx, reason="rtpllm._C built without UCX")


def test_plan_maps_prefill_blocks_onto_decode_blocks():
    prefill, decode = HostPool(4, 64), HostPool(16, 16)
    segments = _C.plan_transfer(prefill.layout, [3, 1], decode.layout, [8, 2, 5, 0, 9, 7, 1, 4], 120)
    assert [(s.src_block, s.src_token, s.dst_block, s.num_tokens) for s in segments][:5] == [
        (3, 0, 8, 16), (3, 16, 2, 16), (3, 32, 5, 16), (3, 48, 0, 16), (1, 0, 9, 16)]
    assert segments[-1].num_tokens == 120 - 7 * 16
    with pytest.raises(ValueError, match="dst_blocks"):
        _C.plan_transfer(prefill.layout, [3, 1], decode.layout, [8, 2], 120)


def test_bad_options_and_layouts_name_the_field():
    with pytest.raises(ValueError, match="timeout_s"):
        _C.TransferOptions(timeout_s=0)
    layout = HostPool(4, 8).layout
    layout.block_stride_bytes = 3
    with pytest.raises(ValueError, match="block_stride_bytes"):
        _C.check_kv_layout(layout)
    engine = make_engine("lonely")
    with pytest.raises(ValueError, match="block_stride_bytes"):
        engine.register_kv(layout)
    # DIRECT maps peers' GPU memory: host KV (no cuda_device) cannot ask for it.
    for kwargs in ({"direct_access": True}, {}):
        options = _C.TransferOptions(data_path=_C.DataPath.DIRECT if not kwargs else _C.DataPath.AUTO)
        with pytest.raises(ValueError, match="direct_access"):
            _C.UcxTransfer(options, **kwargs)


@pytest.mark.parametrize("data_path", ["AUTO", "RMA", "MESSAGES"])
def test_put_then_get_across_block_sizes_in_one_process(data_path):
    prefill_pool, decode_pool = HostPool(8, 16), HostPool(32, 4)
    path = getattr(_C.DataPath, data_path)
    prefill = _C.UcxTransfer(_C.TransferOptions(name="prefill", identity="test-model|fp16", data_path=path))
    assert _C.TransferOptions(data_path=path).data_path == path
    decode = make_engine("decode")
    prefill.register_kv(prefill_pool.layout)
    decode.register_kv(decode_pool.layout)
    peer = prefill.connect("127.0.0.1", decode.listen_port)
    # Over TCP (these tests' transport) AUTO moves bytes by messages.
    assert prefill.peers()[0].data_path == (_C.DataPath.MESSAGES if data_path == "AUTO" else path)
    src, dst = [5, 0, 2], list(range(31, 19, -1))  # 45 tokens: 3 blocks of 16, 12 blocks of 4
    prefill_pool.fill(src, 45, seed=4)
    status = prefill.wait(prefill.put(peer, _C.TransferRequest(request_id=9, local_blocks=src, remote_blocks=dst,
                                                               num_tokens=45)), 5.0)
    assert status.state == _C.TransferState.DONE, status.error
    (notice,) = decode.take_notices(2.0)
    assert (notice.request_id, notice.layer, list(notice.blocks), notice.num_tokens) == (9, -1, dst, 45)
    np.testing.assert_array_equal(decode_pool.tokens(dst, 45), prefill_pool.tokens(src, 45))

    # Read them back into other blocks.
    back = [7, 6, 4]
    status = prefill.wait(prefill.get(peer, _C.TransferRequest(request_id=10, local_blocks=back, remote_blocks=dst,
                                                               num_tokens=45)), 5.0)
    assert status.state == _C.TransferState.DONE, status.error
    np.testing.assert_array_equal(prefill_pool.tokens(back, 45), prefill_pool.tokens(src, 45))
    stats = prefill.stats()
    assert (stats.puts, stats.gets, stats.failed) == (1, 1, 0)

    with pytest.raises(ValueError, match="peer"):
        prefill.put(12345, _C.TransferRequest(request_id=1, local_blocks=src, remote_blocks=dst))
    with pytest.raises(ValueError, match="remote_blocks"):
        prefill.put(peer, _C.TransferRequest(request_id=1, local_blocks=src, remote_blocks=[99] * 12, num_tokens=45))
    with pytest.raises(ValueError, match="handle"):
        prefill.poll(424242)


def test_notice_fd_is_readable_exactly_while_notices_wait():
    # The decode engine waits for notices and for its server's commands in one select (pd/decode_side.py).
    prefill_pool, decode_pool = HostPool(4, 16), HostPool(8, 16)
    prefill, decode = make_engine("prefill"), make_engine("decode")
    prefill.register_kv(prefill_pool.layout)
    decode.register_kv(decode_pool.layout)
    fd = decode.notice_fd()
    assert fd >= 0 and select.select([fd], [], [], 0)[0] == []
    peer = prefill.connect("127.0.0.1", decode.listen_port)
    for request_id in (1, 2):
        status = prefill.wait(prefill.put(peer, _C.TransferRequest(request_id=request_id, local_blocks=[0],
                                                                   remote_blocks=[3], num_tokens=16)), 5.0)
        assert status.state == _C.TransferState.DONE, status.error
    assert select.select([fd], [], [], 2.0)[0] == [fd]
    deadline = time.monotonic() + 2.0
    notices = []
    while len(notices) < 2 and time.monotonic() < deadline:
        notices += decode.take_notices(0.1)
    assert [n.request_id for n in notices] == [1, 2]
    assert select.select([fd], [], [], 0)[0] == []  # taken: not readable until the next notice


def test_put_payload_is_echoed_in_the_notice_and_bounded():
    prefill_pool, decode_pool = HostPool(4, 16), HostPool(8, 8)
    prefill, decode = make_engine("prefill"), make_engine("decode")
    prefill.register_kv(prefill_pool.layout)
    decode.register_kv(decode_pool.layout)
    peer = prefill.connect("127.0.0.1", decode.listen_port)
    request = _C.TransferRequest(request_id=3, local_blocks=[1], remote_blocks=[4, 2], num_tokens=12, layer=1,
                                 payload=b"\x07\x00token")
    status = prefill.wait(prefill.put(peer, request), 5.0)
    assert status.state == _C.TransferState.DONE, status.error
    (notice,) = decode.take_notices(2.0)
    assert (notice.request_id, notice.layer, notice.payload) == (3, 1, b"\x07\x00token")
    with pytest.raises(ValueError, match="payload"):
        prefill.put(peer, _C.TransferRequest(request_id=4, local_blocks=[1], remote_blocks=[4, 2], num_tokens=12,
                                             payload=b"x" * 4097))
    # Without a payload the notice carries none (and the wire format is the old one).
    status = prefill.wait(prefill.put(peer, _C.TransferRequest(request_id=5, local_blocks=[1], remote_blocks=[4, 2],
                                                               num_tokens=12)), 5.0)
    assert status.state == _C.TransferState.DONE, status.error
    (notice,) = decode.take_notices(2.0)
    assert notice.payload == b""
