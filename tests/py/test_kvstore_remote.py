"""The shared remote KV store, end to end on the CPU over UCX TCP: `rtpllm kvstore serve` as a
process, two engine instances (offline LLM objects) sharing it. The second gets tier hits for the
prompts the first computed, with the same tokens as without any tier; a killed store means
recompute, not a stall; a client of another identity and garbage on the store's port are refused
while the store keeps serving. The C++ tests (tests/cpp/transfer_ucx_kvstore_test.cc) cover
pinning, eviction, the disk behind the store and bad requests in depth."""

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from rtpllm import _C
from rtpllm.config import CacheConfig
from rtpllm.serving.engine_args import add_engine_args, engine_config_from_args
from kv_tier_workload import assert_idle, expected_outputs, generate, make_llm, prompts, tier_stats

os.environ.setdefault("UCX_TLS", "tcp")  # CI: TCP over loopback; the store process inherits it
os.environ.setdefault("UCX_NET_DEVICES", "lo")

pytestmark = pytest.mark.skipif(not getattr(_C, "has_kvstore_remote", False), reason="built without UCX")

STORE_FRAME = 6  # MessageType::STORE of the control channel
PIN = 5
ERROR = 11


class StoreProcess:
    """`rtpllm kvstore serve` on a free port; stopped (or killed) by the test."""

    def __init__(self, *extra: str, capacity_gib: float = 0.05):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtpllm.serving.cli", "kvstore", "serve", "--capacity-gib", str(capacity_gib),
             "--port", "0", "--transfer-timeout-s", "3", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"the store did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[-1]
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)
        self.metrics_url = self.proc.stdout.readline().split()[-1]  # "... metrics on http://host:port/metrics"

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, by name (labels are not used by the store)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def stop(self) -> str:
        """Stops it (SIGTERM) and returns its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def store():
    s = StoreProcess()
    yield s
    s.stop()


def remote_llm(store: StoreProcess, **options):
    # No host tier: every hit below the pool must come from the store.
    return make_llm(kv_host_cache_gib=0, kv_store=store.address, **options)


def test_a_second_instance_loads_the_prefixes_the_first_computed(store):
    batch = prompts()[:6]
    first = remote_llm(store)
    assert generate(first, batch) == expected_outputs()[:6]
    first.engine.kv_tiers.flush()  # its saves have landed in the store
    saved = tier_stats(first)["remote"]
    assert saved.saved_blocks >= 6 * 5 and saved.save_bytes == saved.saved_blocks * saved.bytes_per_block

    second = remote_llm(store)
    wait_for_index(second)  # else the first prompts may be matched before the store's index arrived
    assert generate(second, batch) == expected_outputs()[:6]
    remote = tier_stats(second)["remote"]
    # Six prefixes of 5 blocks; a pool too full for a whole prefix loads what fits (the rest is computed).
    # Once the engine has timed both, a store slower than recomputing is skipped (on a tiny model on a
    # loaded machine it can be): the first prefix loads before anything is timed, the rest load or skip.
    assert remote.loaded_blocks >= 5 and remote.loaded_blocks + remote.skipped_blocks >= 5 * 4, (
        f"the prefixes the first instance computed must come from the store: {remote}")
    assert remote.load_bytes == remote.loaded_blocks * remote.bytes_per_block
    assert remote.failed_loads == 0 and remote.enabled
    assert remote.capacity_blocks > 0 and remote.used_blocks >= saved.saved_blocks
    assert second.engine.stats().kv_tier_hit_tokens == remote.loaded_blocks * 16
    assert_idle(second)
    # The store's own account, on its Prometheus endpoint.
    m = store.metrics()
    assert m["rtpllm:kvstore_hit_blocks_total"] >= remote.loaded_blocks
    assert m["rtpllm:kvstore_bytes_out_total"] == m["rtpllm:kvstore_hit_blocks_total"] * remote.bytes_per_block
    assert m["rtpllm:kvstore_saved_blocks_total"] >= saved.saved_blocks
    assert m["rtpllm:kvstore_bytes_in_total"] == m["rtpllm:kvstore_saved_blocks_total"] * remote.bytes_per_block > 0
    assert 0 < m["rtpllm:kvstore_blocks_held"] <= m["rtpllm:kvstore_saved_blocks_total"]
    assert m["rtpllm:kvstore_blocks_pinned"] == 0  # every load released its pin
    assert m["rtpllm:kvstore_clients"] >= 1 and m["rtpllm:kvstore_expired_pins_total"] == 0
    assert m["rtpllm:kvstore_pin_requests_total"] >= 1 and "rtpllm:kvstore_misses_total" in m
    assert "rtpllm:kvstore_evicted_blocks_total" in m
    log = store.stop()
    assert "refused clients 0," in log and "saved 0," not in log
    assert "(0 pinned," in log, "every pin was released"


def wait_for_index(llm, timeout_s: float = 30) -> None:
    """Until the store's index reached this instance: its copy arrives asynchronously after the
    hello, and a prompt matched before that finds nothing in the store."""
    deadline = time.monotonic() + timeout_s
    while tier_stats(llm)["remote"].used_blocks == 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_killed_store_means_recompute_not_a_stall(store):
    batch = prompts()[:6]
    first = remote_llm(store)
    generate(first, batch)
    first.engine.kv_tiers.flush()
    second = remote_llm(store)
    wait_for_index(second)
    assert generate(second, batch[:3]) == expected_outputs()[:3]
    assert tier_stats(second)["remote"].loaded_blocks > 0
    store.kill()  # between two waves: the next one finds it gone, or loads from it and fails
    start = time.monotonic()
    assert generate(second, prompts()[3:]) == expected_outputs()[3:]
    assert time.monotonic() - start < 60
    assert not tier_stats(second)["remote"].enabled
    # It keeps answering, the store still gone.
    assert generate(second, batch[:3]) == expected_outputs()[:3]
    assert_idle(second)


def wait_until_stopped(pid: int, timeout_s: float = 10.0) -> None:
    """Until every thread of `pid` is stopped: kill() returns before a signal's stop reaches the
    threads, and a store thread still running answered the pins of the loads that followed (1 run
    in 4 on a loaded 2-core machine), so the test met a store that was not hung yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(") ", 1)[1][0])
        if all(state in "Tt" for state in states):
            return
        assert time.monotonic() < deadline, f"the store's threads did not stop: {states}"
        time.sleep(0.001)


def test_a_hung_store_is_dropped_within_the_timeout(store):
    batch = prompts()[:3]
    first = remote_llm(store)
    generate(first, batch)
    first.engine.kv_tiers.flush()
    second = remote_llm(store)
    # First the store's index reaches this instance and a load works, so the next prompts match
    # in the store and their loads must meet the hung store.
    wait_for_index(second)
    assert generate(second, batch[:1]) == expected_outputs()[:1]
    assert tier_stats(second)["remote"].loaded_blocks > 0
    store.proc.send_signal(signal.SIGSTOP)  # alive, sockets open, answering nothing
    wait_until_stopped(store.proc.pid)
    try:
        start = time.monotonic()
        assert generate(second, batch[1:]) == expected_outputs()[1:3]
        assert time.monotonic() - start < 60
        assert not tier_stats(second)["remote"].enabled
        assert_idle(second)
    finally:
        store.proc.send_signal(signal.SIGCONT)


def test_an_instance_starts_before_its_store_and_serves_meanwhile():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = make_llm(kv_host_cache_gib=0, kv_store=f"127.0.0.1:{port}")
    assert generate(llm, prompts()[:3]) == expected_outputs()[:3]
    assert not tier_stats(llm)["remote"].enabled


def test_a_client_of_another_identity_is_refused_on_both_sides():
    store = StoreProcess("--identity", "1234abcd")
    try:
        with pytest.raises(ValueError, match="kv_store: .*cache identity mismatch"):
            remote_llm(store)
        assert store.proc.poll() is None, "the store must survive a refused client"
    finally:
        log = store.stop()
    assert "cache identity mismatch" in log


def _frame(payload: bytes) -> bytes:
    return struct.pack("<II", STORE_FRAME, len(payload)) + payload


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 8:
        chunk = sock.recv(8 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    kind, length = struct.unpack("<II", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return kind, body


def test_garbage_on_the_store_port_is_refused_and_the_store_keeps_serving(store):
    with socket.create_connection((store.host, store.port), timeout=5) as s:  # not a frame at all
        s.sendall(b"\xff" * 64)
        assert s.recv(4096) == b"" or True  # the store closes it (maybe after an error frame)
    with socket.create_connection((store.host, store.port), timeout=5) as s:  # a PIN before HELLO
        s.sendall(_frame(struct.pack("<IQI", PIN, 7, 1) + struct.pack("<Q", 42)))
        kind, body = _read_frame(s)
        assert kind == STORE_FRAME and struct.unpack_from("<I", body)[0] == ERROR
        assert b"HELLO" in body
    with socket.create_connection((store.host, store.port), timeout=5) as s:  # a lying length
        s.sendall(_frame(struct.pack("<IQI", PIN, 7, 10**9)))
        kind, body = _read_frame(s)
        assert b"malformed" in body
    assert store.proc.poll() is None
    llm = remote_llm(store)
    assert tier_stats(llm)["remote"].enabled
    assert generate(llm, prompts()[:3]) == expected_outputs()[:3]


def test_kv_store_flag_maps_onto_the_config():
    parser = add_engine_args(argparse.ArgumentParser())
    assert engine_config_from_args(parser.parse_args(["--kv-store", "10.0.0.7:8200"])).cache.kv_store == "10.0.0.7:8200"
    assert engine_config_from_args(parser.parse_args([])).cache.kv_store is None


def test_kv_store_option_is_checked():
    with pytest.raises(ValueError, match="kv_store"):
        CacheConfig(kv_store="no-port")
    with pytest.raises(ValueError, match="kv_store"):
        CacheConfig(kv_store="host:99999")
    with pytest.raises(ValueError, match="kv_store"):
        CacheConfig(kv_store="host:8200", enable_prefix_caching=False)


def test_kvstore_serve_refuses_bad_options():
    result = subprocess.run([sys.executable, "-m", "rtpllm.serving.cli", "kvstore", "serve", "--capacity-gib", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--capacity-gib" in result.stderr
    result = subprocess.run([sys.executable, "-m", "rtpllm.serving.cli", "kvstore", "serve", "--capacity-gib", "1",
                             "--identity", "xyz"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--identity" in result.stderr
    result = subprocess.run([sys.executable, "-m", "rtpllm.serving.cli", "kvstore", "serve", "--capacity-gib", "1",
                             "--transfer-timeout-s", "5", "--pin-lease-s", "5"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--pin-lease-s" in result.stderr
