"""A raw websocket client for fuzzing: any frame, valid or not, written exactly as given (RFC 6455 §5.2),
over the broker's unix socket. Nothing here knows exec: frames in, the server's frames and close out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MASK_KEY = b"\x5a\xa5\x3c\xc3"  # fixed: a run is reproducible byte for byte
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@dataclass(frozen=True)
class Frame:
    """One frame as it goes on the wire. ``length`` is the payload length the header claims (None: the
    payload's own); a larger claim than is sent leaves the frame unfinished."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0  # the three RSV bits (no extension is negotiated: any set bit is a protocol error)
    masked: bool = True  # a client must mask (§5.1)
    length: int | None = None

    def encode(self) -> bytes:
        n = len(self.payload) if self.length is None else self.length
        head = bytes([(0x80 if self.fin else 0) | (self.rsv & 7) << 4 | (self.opcode & 0xF)])
        mask_bit = 0x80 if self.masked else 0
        if n < 126:
            head += bytes([mask_bit | n])
        elif n < 1 << 16:
            head += bytes([mask_bit | 126]) + struct.pack("!H", n)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", n & (1 << 64) - 1)
        if not self.masked:
            return head + self.payload
        return head + MASK_KEY + mask(self.payload, MASK_KEY)


def mask(data: bytes, key: bytes) -> bytes:
    """XOR with the repeated key, as one big-integer operation (16 MiB in milliseconds)."""
    if not data:
        return data
    n = len(data)
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code & 0xFFFF) + reason


@dataclass
class Refused:
    """An upgrade the server answered with an HTTP response instead of 101."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RawSocket:
    """An upgraded connection. A reader task keeps taking the server's frames (so that the server never
    blocks on us), until its close frame or EOF."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: list[tuple[int, bytes]] = field(default_factory=list)  # (opcode, payload) of data frames
    close_code: int | None = None  # from the server's close frame (1005: one without a code)
    close_on_barrier: bool = False  # answer the first text frame with a close, as the Go client does
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._read())

    async def send(self, data: bytes) -> bool:
        """Write raw bytes; False when the server has already gone."""
        if self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def send_frames(self, frames: list[Frame]) -> bool:
        return await self.send(b"".join(f.encode() for f in frames))

    async def closed(self, timeout: float) -> None:
        """Wait until the server has closed the connection (its close frame or EOF); TimeoutError if not."""
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    @property
    def is_closed(self) -> bool:
        return self._task is not None and self._task.done()

    def abort(self) -> None:
        """Drop the connection without a close frame."""
        transport = self.writer.transport
        transport.abort()

    async def aclose(self) -> None:
        self.abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def data(self) -> tuple[bytes, bool]:
        """The binary payloads received, and whether the empty-text barrier came after them."""
        out = bytearray()
        for opcode, payload in self.received:
            if opcode == TEXT:
                return bytes(out), True
            out += payload
        return bytes(out), False

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(2)
                n = head[1] & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                if head[1] & 0x80:  # a server must not mask; take the key anyway
                    await self.reader.readexactly(4)
                payload = await self.reader.readexactly(n)
                opcode = head[0] & 0xF
                if opcode == CLOSE:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    return
                if opcode in (TEXT, BINARY, CONT):
                    self.received.append((opcode, payload))
                if opcode == TEXT and self.close_on_barrier:
                    self.close_on_barrier = False
                    await self.send(Frame(CLOSE, close_payload(1000)).encode())
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return


async def connect(socket: Path, path: str, timeout: float, close_on_barrier: bool = False) -> RawSocket | Refused:
    """The upgrade handshake for ``path`` (with its query); the open socket, or the server's refusal."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket), limit=1 << 26), timeout)
    try:
        writer.write((f"GET {path} HTTP/1.1\r\nHost: eb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except BaseException:
        writer.transport.abort()
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if status == 101:
        sock = RawSocket(reader, writer, close_on_barrier=close_on_barrier)
        sock.start()
        return sock
    try:
        if "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
        else:
            body = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.transport.abort()
    return Refused(status, headers, body)
