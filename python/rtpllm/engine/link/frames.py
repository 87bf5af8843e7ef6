"""Length-prefixed pickled messages over a stream socket, for the server and its engine process
(and the engine and its tensor-parallel workers). The messages are the typed ones of
link/messages.py; a frame holds one, in the wire form `to_wire` gives it.

Both ends keep their socket non-blocking: a writer that cannot send everything keeps the rest
and sends it when the socket is writable again, so neither side can stall the other (an engine
blocked on a full socket would stop reading commands, and a server blocked the same way would
stop reading outputs: a deadlock).
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

from rtpllm.engine.link.messages import LinkMessage, MalformedMessage, from_wire, to_wire

_HEADER = struct.Struct("<Q")
_RECV_BYTES = 1 << 20


def encode_frame(message: LinkMessage) -> bytes:
    payload = pickle.dumps(to_wire(message), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def decode_payload(payload: Any) -> LinkMessage:
    """The message in one frame's payload; MalformedMessage when it holds none."""
    try:
        wire = pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - garbage, or a class this side does not have
        raise MalformedMessage(f"link frame: cannot unpickle its {len(payload)} bytes: {exc!r}") from exc
    return from_wire(wire)


class FrameReader:
    """Collects received bytes and returns the complete messages among them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def partial(self) -> bool:
        """Whether a frame has begun to arrive and not yet ended."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[LinkMessage]:
        buffer = self._buffer
        if buffer:
            buffer += data
            source = buffer
        else:  # NOTE: the usual case (whole frames, nothing left over): read them from `data`, uncopied
            source = data
        messages = []
        start, end = 0, len(source)
        view = memoryview(source)
        try:
            while end - start >= _HEADER.size:
                (length,) = _HEADER.unpack_from(source, start)
                if end - start - _HEADER.size < length:
                    break
                begin = start + _HEADER.size
                messages.append(decode_payload(view[begin:begin + length]))
                start = begin + length
        finally:
            view.release()
        if source is buffer:
            if start:
                del buffer[:start]
        elif start < end:
            buffer += data[start:]  # the start of a frame still to come
        return messages


    def receive(self, sock: socket.socket, error_closes: bool = False) -> tuple[list[LinkMessage], bool]:
        """Reads everything a non-blocking socket holds now; returns the complete messages and
        whether the other end has closed. Other socket errors are raised, or with `error_closes`
        count as a close (the messages read before them are still returned)."""
        messages = []
        while True:
            try:
                data = sock.recv(_RECV_BYTES)
            except BlockingIOError:
                return messages, False
            except OSError:
                if not error_closes:
                    raise
                return messages, True
            if not data:
                return messages, True
            messages += self.feed(data)


class FrameWriter:
    """Sends frames on a non-blocking socket, keeping what the socket did not take.

    The unsent bytes are `_pending[_sent:]`: a send advances the offset, and the buffer is
    compacted only once the sent part is at least half of it, so a backlog that the reader works
    off in many small sends costs O(bytes), not a memmove of the whole backlog per send."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending = bytearray()
        self._sent = 0

    @property
    def pending(self) -> bool:
        return self._sent < len(self._pending)

    def write(self, frame: bytes) -> bool:
        """Queues and sends `frame`; True when nothing is left unsent."""
        if not self.pending:
            try:
                sent = self._sock.send(frame)
            except BlockingIOError:
                sent = 0
            if sent == len(frame):
                return True
            self._pending = bytearray(memoryview(frame)[sent:])
            self._sent = 0
            return False
        self._pending += frame
        return self.flush()

    def flush(self) -> bool:
        """Sends what it can of the queued bytes; True when nothing is left unsent."""
        try:
            with memoryview(self._pending) as view:
                while self._sent < len(view):
                    self._sent += self._sock.send(view[self._sent:])
        except BlockingIOError:
            if self._sent * 2 >= len(self._pending):
                del self._pending[:self._sent]
                self._sent = 0
            return False
        self._pending.clear()
        self._sent = 0
        return True


def send_blocking(sock: socket.socket, message: LinkMessage) -> None:
    sock.sendall(encode_frame(message))


def recv_blocking(sock: socket.socket) -> LinkMessage:
    """One message from a blocking socket; EOFError when the other end closed first."""
    header = _recv_exactly(sock, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    return decode_payload(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, _RECV_BYTES))
        if not chunk:
            raise EOFError("the other end closed the connection")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
