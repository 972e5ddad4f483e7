"""A server websocket after its opening handshake, as an asyncio protocol, a ``core.channel.Channel`` and
a ``core.channel.Port``: what the exec websockets run on (api/fastpath.py does the handshake).

Incoming frames are parsed by websockets' sans-IO protocol (RFC 6455: masking, fragments, control frames,
the close handshake, the message bound); messages go to the port's receiver as they are complete, or
queue for the one reader, and reading stops while more than ``READ_AHEAD`` bytes wait unread (or the
receiver paused us), so a client that sends faster than its command reads slows down instead of growing
our memory. Outgoing data frames are written straight to the transport: server frames are not masked,
so a large payload leaves as it is, after a header of a few bytes (no copy into a frame); a sender waits
while the transport is over its high-water mark (``pause_writing``).

Keepalive (spec §5.7): a ``keepalive`` ping every ``PING_INTERVAL`` seconds (one timer for every
connection of the loop, core/aio.Ticker), skipped while the transport is backed up; pongs are never
awaited. A client that sends pings without reading the pongs stops being read until what we wrote drains.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from core import aio
from core.channel import ChannelClosed, Receiver

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 << 20  # a websocket message larger than this closes the socket (1009)
PING_INTERVAL = 10.0
CLOSE_GRACE = 30.0  # seconds a client has, after our close frame, to read up to it and close
READ_AHEAD = 1 << 20  # unread message bytes queued before reading from the socket stops
SMALL_FRAME = 16 << 10  # up to this size a data frame is one write (header and payload joined)
_H2 = struct.Struct("!BB")
_H4 = struct.Struct("!BBH")
_H10 = struct.Struct("!BBQ")
_BINARY, _TEXT = 0x82, 0x81  # FIN and the opcode


def frame_header(first: int, size: int) -> bytes:
    """The header of an unmasked (server) frame carrying ``size`` payload bytes."""
    if size < 126:
        return _H2.pack(first, size)
    if size < 1 << 16:
        return _H4.pack(first, 126, size)
    return _H10.pack(first, 127, size)


class WebSocketConnection(asyncio.Protocol):
    """One accepted websocket. ``connections`` is the listener's set of open connections (its bound and
    its shutdown count this one)."""

    def __init__(self, transport: asyncio.Transport, connections: set[Any], max_message: int = MAX_MESSAGE,
                 ping_interval: float = PING_INTERVAL) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.conn = ServerProtocol(state=State.OPEN, max_size=max_message)
        self._connections = connections
        self._inbox: collections.deque[bytes | str] = collections.deque()
        self._inbox_bytes = 0
        self._reader: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._write_paused = False
        self._read_paused = False  # by us: unread messages, or pongs not yet sent
        self._pong_paused = False
        self.remote_closed = False  # the client's close frame arrived, or the connection is gone
        self.local_closed = False  # we sent our close frame (or will send nothing more)
        self.lost = False
        self._cut_at: float | None = None  # a client that has not closed by then is cut off
        self._ticker = aio.ticker(ping_interval)  # keepalive pings and the close cut-off, shared timer
        self._receiver: Receiver | None = None  # Port: where messages go (else the inbox, for receive())
        self._held = False  # Port: the receiver paused us
        self._drain_callbacks: list[Callable[[], None]] = []
        self._ended = False  # Port: the receiver was told (None)
        connections.add(self)
        self._ticker.add(self)

    # -- asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # set_protocol() calls nothing
        pass

    def data_received(self, data: bytes) -> None:
        if self.remote_closed:
            return
        self.conn.receive_data(data)
        events = self.conn.events_received()
        wrote = self._flush()  # pongs and a close echo go out before anyone hears of the messages
        for frame in events:
            self._frame(frame)
        wrote = self._flush() or wrote  # what handling them queued (a 1007 close)
        if wrote and self._write_paused and not self.transport.is_closing():
            self._pong_paused = True  # pongs (or a close) we cannot send yet: stop reading until they are
            self._pause_reading()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._flush()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.remote_closed = True
        self._connections.discard(self)
        self._ticker.discard(self)
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()
        if self._pong_paused:
            self._pong_paused = False
            self._resume_reading()

    # -- Channel ------------------------------------------------------------------------------------------
    async def receive(self) -> bytes | str | None:
        while not self._inbox:
            if self.remote_closed or self.local_closed:
                return None
            self._reader = self.loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        msg = self._inbox.popleft()
        self._inbox_bytes -= len(msg)
        self._resume_reading()
        return msg

    async def send_bytes(self, data: bytes) -> None:
        self._send(_BINARY, data)
        if self._write_paused:
            await self._wait_drained()

    async def send_text(self, text: str) -> None:
        self._send(_TEXT, text.encode())
        if self._write_paused:
            await self._wait_drained()

    async def close(self, code: int = 1000) -> None:
        self.close_now(code, "")

    # -- Port -----------------------------------------------------------------------------------------------
    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._pass_on()

    def pause(self) -> None:
        self._held = True
        self._pause_reading()

    def resume(self) -> None:
        self._held = False
        self._pass_on()

    def offer(self, data: bytes | str) -> bool:
        if self.local_closed or self.lost or self.transport.is_closing():
            return True  # gone: dropped
        if isinstance(data, str):
            self._send(_TEXT, data.encode())
        else:
            self._send(_BINARY, data)
        return not self._write_paused

    def when_drained(self, callback: Callable[[], None]) -> None:
        if self._write_paused and not (self.local_closed or self.lost):
            self._drain_callbacks.append(callback)
        else:
            self.loop.call_soon(callback)

    def shut(self, code: int = 1000) -> None:
        self.close_now(code, "")

    def _pass_on(self) -> None:
        """Queued messages to the receiver while it takes them; then the end, once."""
        while self._inbox and not self._held and self._receiver is not None:
            msg = self._inbox.popleft()
            self._inbox_bytes -= len(msg)
            self._receiver(msg)
        if (not self._inbox and (self.remote_closed or self.local_closed) and not self._ended
                and self._receiver is not None):
            self._ended = True
            self._receiver(None)
        self._resume_reading()  # what stopped reading may have been taken now

    # -- closing --------------------------------------------------------------------------------------------
    def close_now(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` whatever a sender is doing (a blocked one gets ChannelClosed):
        the close frame goes after what the transport holds; a client that has not read up to it and
        closed ``CLOSE_GRACE`` seconds later is cut off."""
        if self.local_closed or self.lost:
            return
        self.local_closed = True
        if self.conn.state is State.OPEN:
            self.conn.send_close(code, reason)
            self._flush()
        if self.remote_closed:
            self.transport.close()
        elif self._cut_at is None:
            self._cut_at = self.loop.time() + CLOSE_GRACE
        self._wake_reader()
        self._wake_writer()

    def revoke(self, reason: str, code: int = 1008) -> None:
        """Close with ``code`` (1008: policy violation) and end the connection once what it holds is sent,
        without waiting for the client's close frame: a revoked certificate, a dropped events listener."""
        self.close_now(code, reason)
        self.transport.close()

    def shutdown(self) -> None:
        """The server stops (uvicorn calls this on every connection it counts)."""
        self.close_now(1012, "server shutting down")
        self.transport.close()

    # -- inside -----------------------------------------------------------------------------------------------
    def _send(self, first: int, data: bytes) -> None:
        if self.local_closed or self.lost or self.transport.is_closing():
            raise ChannelClosed("the websocket is closed")
        header = frame_header(first, len(data))
        if len(data) <= SMALL_FRAME:
            self.transport.write(header + data)
        else:  # the payload as it is: no copy of a large frame into header + payload
            self.transport.write(header)
            self.transport.write(data)

    async def _wait_drained(self) -> None:
        while self._write_paused:
            if self.local_closed or self.lost:
                raise ChannelClosed("the websocket is closed")
            drained = self.loop.create_future()
            self.when_drained(lambda: drained.done() or drained.set_result(None))
            await drained
        if self.lost:
            raise ChannelClosed("the websocket is closed")

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if frame.fin:
                self._deliver(op is Opcode.TEXT, frame.data)
            else:
                self._fragment_text = op is Opcode.TEXT
                self._fragments = [frame.data]
        elif op is Opcode.CONT:
            self._fragments.append(frame.data)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._deliver(self._fragment_text, data)
        elif op is Opcode.CLOSE:
            self.remote_closed = True
            self._wake_reader()
            self._wake_writer()

    def _deliver(self, text: bool, data: bytes) -> None:
        msg: bytes | str = data
        if text:
            try:
                msg = data.decode()
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8")
                return
        if self.local_closed:
            return  # what a client sends after our close frame is read and dropped
        if self._receiver is not None and not self._held and not self._inbox:
            self._receiver(msg)
            return
        self._inbox.append(msg)
        self._inbox_bytes += len(msg)
        if self._inbox_bytes >= READ_AHEAD:
            self._pause_reading()
        self._wake_reader()

    def _fail(self, code: int, reason: str) -> None:
        self.conn.fail(code, reason)
        self.remote_closed = True
        self._wake_reader()

    def _flush(self) -> bool:
        """Write what the sans-IO protocol queued (pongs, close frames); its end-of-stream closes."""
        wrote = False
        for chunk in self.conn.data_to_send():
            if chunk:
                self.transport.write(chunk)
                wrote = True
            else:
                self.transport.close()  # after what it holds
        if self.conn.state is State.CLOSED or (self.remote_closed and self.local_closed):
            self.transport.close()
        return wrote

    def _pause_reading(self) -> None:
        if not self._read_paused and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        """Read again, unless something still holds reading: the receiver, unread messages, pongs."""
        if self._held or self._pong_paused or self._inbox_bytes >= READ_AHEAD:
            return
        if self._read_paused and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)
        if self._receiver is not None:
            self._pass_on()

    def _wake_writer(self) -> None:
        if self._drain_callbacks:
            callbacks, self._drain_callbacks = self._drain_callbacks, []
            for callback in callbacks:
                callback()

    def tick(self, now: float) -> None:
        """Every ``PING_INTERVAL``: a keepalive ping, or the cut-off of a client that never closed."""
        if self.lost:
            self._ticker.discard(self)
        elif self._cut_at is not None:
            if now >= self._cut_at:
                self.transport.abort()
        elif self.conn.state is State.OPEN and not self._write_paused:  # a ping never waits behind data
            self.conn.send_ping(b"keepalive")
            self._flush()
