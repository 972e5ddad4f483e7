"""The member link's frames, IO-free: a 9-byte header (kind, stream or request id, payload length) and the
payload. One link carries every call, event batch and relayed exec websocket between two members
(broker/mux.py); each kind has a payload bound, and a frame past it, or of a kind nobody sends, is a
protocol error that ends the link (only members reach it, so it means a bug, never a client's input)."""

from __future__ import annotations

import struct
from enum import IntEnum

HEADER = struct.Struct("!BII")
CREDIT = struct.Struct("!I")
CLOSE = struct.Struct("!H")


class Kind(IntEnum):
    HELLO = 0  # the dialer's name and member address (id 0), first frame of a link
    CALL = 1  # a NodeService call: {"method", "args"} (id: the request)
    REPLY = 2  # its answer: {"ok": ...} or {"error": [status, message]}
    EVENTS = 3  # a batch of events of the sender's origin, as JSON (id 0)
    OPEN = 4  # open an exec websocket of an operation: {"op", "secret", "identity", "offset"}
    ACCEPT = 5  # the owner took it: data may flow
    REFUSE = 6  # the owner's refusal: [status, message]
    BINARY = 7  # a websocket binary message
    TEXT = 8  # a websocket text message (utf-8)
    CREDIT = 9  # the reader consumed this many more bytes of the stream: u32
    CLOSE = 10  # the stream ends: u16 close code


_K = 1 << 10
_M = 1 << 20
MAX_PAYLOAD: dict[int, int] = {
    Kind.HELLO: 4 * _K, Kind.CALL: 4 * _M + 64 * _K, Kind.REPLY: 64 * _M, Kind.EVENTS: 64 * _M,
    Kind.OPEN: 64 * _K, Kind.ACCEPT: 0, Kind.REFUSE: 64 * _K, Kind.BINARY: 16 * _M, Kind.TEXT: 16 * _M,
    Kind.CREDIT: CREDIT.size, Kind.CLOSE: CLOSE.size,
}
STREAM_KINDS = frozenset({Kind.ACCEPT, Kind.REFUSE, Kind.BINARY, Kind.TEXT, Kind.CREDIT, Kind.CLOSE})


class FrameError(Exception):
    """The peer broke the framing: unknown kind or a payload past its bound."""


def header(kind: Kind, ident: int, length: int) -> bytes:
    return HEADER.pack(kind, ident, length)


def frame(kind: Kind, ident: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, ident, len(payload)) + payload


class Decoder:
    """Bytes in, whole frames out. A frame's header is checked as soon as it arrives, so an oversized
    length is refused before its payload is awaited; a partial frame is kept without re-copying."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, int, bytes]]:
        if self._buf:
            self._buf += data
            view: bytes | bytearray = self._buf
        else:
            view = data
        frames: list[tuple[Kind, int, bytes]] = []
        pos, end = 0, len(view)
        while end - pos >= HEADER.size:
            kind, ident, length = HEADER.unpack_from(view, pos)
            bound = MAX_PAYLOAD.get(kind)
            if bound is None:
                raise FrameError(f"unknown frame kind {kind}")
            if length > bound:
                raise FrameError(f"{Kind(kind).name} frame of {length} bytes (limit {bound})")
            stop = pos + HEADER.size + length
            if stop > end:
                break
            frames.append((Kind(kind), ident, bytes(view[pos + HEADER.size:stop])))
            pos = stop
        if pos == 0:
            if view is not self._buf:
                self._buf = bytearray(view)
        else:
            self._buf = bytearray(view[pos:]) if pos < end else bytearray()
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
