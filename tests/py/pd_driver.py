"""An in-test stand-in for `rtpllm router --prefill P --decode D`: the PD hand-off of protocol.py
driven by hand, and `rtpllm serve` processes to drive, for tests/py/test_pd_*.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional

import httpx

from checkpoints import checkpoint_path

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Instance:
    """`rtpllm serve` in a process of its own (its engine in another one)."""

    def __init__(self, *flags: str, env: Optional[dict] = None, model: Optional[str] = None, tcp: bool = True):
        """`tcp`: KV over UCX's TCP transport on loopback (CPU tests); off, UCX picks (CUDA IPC on a GPU)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "rtpllm.serving.cli", "serve", "--model", model or checkpoint_path("llama3"),
                   "--port", str(self.port), "--disable-uvicorn-access-log", *flags]
        if "--num-blocks" not in flags and "--gpu-memory-utilization" not in flags:
            command += ["--num-blocks", "64"]
        # Off TCP: whatever the caller's environment pinned, UCX picks its transports itself.
        base = ENV if tcp else {**{k: v for k, v in os.environ.items() if k not in ("UCX_TLS", "UCX_NET_DEVICES")},
                                "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**base, **(env or {})}, start_new_session=True)
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.append(line)

    def wait_ready(self, timeout_s: float = 120) -> "Instance":
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, "".join(self.log)
            assert time.monotonic() < deadline, "server did not come up:\n" + "".join(self.log)
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL to the server and its engine process (its session)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and all(w in line for w in want):
                key = line.split(" ")[0]
                if key == name or key.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def sse_events(response: httpx.Response):
    """The JSON payloads of an SSE response, up to [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)


# A colocated instance and a PD pair as the GPU tests run them: prefill blocks of 32, decode 16.
PD_GPU_TRIO = (("--block-size", "16"), ("--role", "prefill", "--block-size", "32"),
               ("--role", "decode", "--block-size", "16", "--pd-timeout-s", "20"))


@contextlib.contextmanager
def started_one_at_a_time(flag_sets, *common: str, model: Optional[str] = None, tcp: bool = True,
                          timeout_s: float = 300) -> Iterator[list[Instance]]:
    """Instances (common flags, then each set's own), each started once the one before is ready
    (on one GPU each sizes its KV pool from the memory free when it starts), all stopped at the end."""
    started: list[Instance] = []
    try:
        for flags in flag_sets:
            instance = Instance(*common, *flags, model=model, tcp=tcp)
            started.append(instance)
            instance.wait_ready(timeout_s)
        yield started
    finally:
        for instance in started:
            instance.stop()


class PDRun:
    """One request through decode then prefill, as the router does it: one after the other, or with
    `overlap` both at once, the destination following the prefill request (after
    `destination_delay_s`; None: never sent)."""

    def __init__(self, prefill: Instance, decode: Instance, endpoint: str, body: dict, pd_request_id: str):
        self.prefill, self.decode = prefill, decode
        self.endpoint, self.body, self.pd_request_id = endpoint, body, pd_request_id
        self.destination: Optional[dict] = None
        self.prefill_response: Optional[httpx.Response] = None
        self.destination_response: Optional[httpx.Response] = None
        self.events: list[dict] = []
        self.reservation_error: Optional[dict] = None

    def run(self, timeout_s: float = 60, overlap: bool = False, destination_delay_s: Optional[float] = 0.0) -> "PDRun":
        decode_body = {"pd_request_id": self.pd_request_id, "endpoint": self.endpoint, "request": self.body}
        prefill_thread = None
        if overlap:
            def prefill() -> None:
                self.prefill_response = httpx.post(self.prefill.url + "/internal/pd/prefill", json=decode_body,
                                                   timeout=timeout_s)
            prefill_thread = threading.Thread(target=prefill)
            prefill_thread.start()
        with httpx.Client(timeout=timeout_s) as client:
            with client.stream("POST", self.decode.url + "/internal/pd/decode", json=decode_body) as stream:
                events = sse_events(stream)
                first = next(events)
                if "pd_reserved" not in first:
                    self.reservation_error = first
                else:
                    self.destination = first["pd_reserved"]
                    if not overlap:
                        self.prefill_response = client.post(self.prefill.url + "/internal/pd/prefill",
                                                            json={**decode_body, "destination": self.destination})
                    elif destination_delay_s is not None:
                        time.sleep(destination_delay_s)
                        self.destination_response = client.post(
                            self.prefill.url + "/internal/pd/prefill/destination",
                            json={"pd_request_id": self.pd_request_id, "destination": self.destination})
                    self.events = list(events)
        if prefill_thread is not None:
            prefill_thread.join(timeout_s)
        return self

    def text(self) -> str:
        """The generated text, from the stream's chunks or the one complete response."""
        parts = []
        for event in self.events:
            for choice in event.get("choices", []):
                if "text" in choice:
                    parts.append(choice["text"])
                elif "message" in choice:
                    parts.append(choice["message"].get("content") or "")
                elif "delta" in choice:
                    parts.append(choice["delta"].get("content") or "")
        return "".join(parts)
