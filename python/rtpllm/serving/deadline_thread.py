"""Runs a function in a thread of its own and stops it at a deadline.

    text = await run_with_deadline(lambda: template.render(...), timeout_s=5.0)   # DeadlineExceeded

For Python code that can loop without end, such as a chat template a client sent: a thread cannot
be killed, but CPython can raise an exception in it (`PyThreadState_SetAsyncExc`), which it does
at the thread's next bytecode. Code stuck in one long C call stops when that call returns.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The function did not return within its time."""


async def run_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    loop = asyncio.get_running_loop()
    result: asyncio.Future = loop.create_future()
    lock = threading.Lock()
    finished = injected = False

    def settle(value, error) -> None:
        if not result.done():
            result.set_exception(error) if error is not None else result.set_result(value)

    def target() -> None:
        nonlocal finished
        try:
            try:
                value, error = fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                value, error = None, exc
            with lock:
                finished = True
                if injected:  # raised already, or still pending: clear it so it cannot escape below
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
        except DeadlineExceeded as exc:  # arrived after fn returned, before `finished` was set
            value, error = None, exc
        if isinstance(error, DeadlineExceeded):
            error = DeadlineExceeded(f"did not finish within {timeout_s:g}s")
        loop.call_soon_threadsafe(settle, value, error)

    thread = threading.Thread(target=target, name="rtpllm-deadline", daemon=True)

    def on_deadline() -> None:
        nonlocal injected
        with lock:
            if not finished:
                injected = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(DeadlineExceeded))

    thread.start()
    # Not cancelled with the awaiting task: a caller that goes away must not leave the thread running.
    loop.call_later(timeout_s, on_deadline)
    return await result
