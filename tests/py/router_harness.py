"""Runs `rtpllm router`'s app on a loopback port inside the test process (as server_harness.py
runs instances), and a few helpers the router suites share."""

from __future__ import annotations

import time
from typing import Callable

import httpx
import uvicorn

from server_harness import UvicornThread


class RunningApp(UvicornThread):
    def __init__(self, app):
        self.app = app
        super().__init__(uvicorn.Config(app, log_level="warning", access_log=False))

    def state(self, headers=None) -> dict:
        return httpx.get(self.url + "/router/state", headers=headers).json()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
