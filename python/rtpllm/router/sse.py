"""Server-sent events from an upstream byte stream, split into whole events.

The PD flow must read the decode instance's stream event by event (its first event is the
reservation, which the client never sees), and passes on only whole events, so a stream that
breaks off mid-event still ends with a well-formed error event for the client.
"""

from __future__ import annotations

import json
from typing import Any, Optional

DONE = b"data: [DONE]\n\n"


class EventSplitter:
    """Feed it bytes as they arrive; it returns the events completed so far (each with its
    trailing blank line), keeping an unfinished one for the next feed."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._pending + data
        if b"\r" in buffer:  # servers may end lines with CRLF; events are compared in LF form
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._pending = buffer
            return []
        self._pending = buffer[end + 2:]
        return [event + b"\n\n" for event in buffer[:end].split(b"\n\n") if event.strip()]

    @property
    def pending(self) -> bytes:
        return self._pending


def event_data(event: bytes) -> bytes:
    """The payload of one event: its `data:` lines joined (comments and other fields dropped)."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def event_json(event: bytes) -> Optional[Any]:
    """The event's payload as JSON; None for `[DONE]`, a comment or a payload that is not JSON."""
    data = event_data(event)
    if not data or data == b"[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def is_done(event: bytes) -> bool:
    return event_data(event) == b"[DONE]"
