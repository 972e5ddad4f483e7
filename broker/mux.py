"""One persistent member link between two members: a single mutual-TLS connection (ALPN
``execbroker-link/1`` on the member listener) multiplexing every call, event batch and relayed exec
websocket of the pair. No dial and no handshake per request or socket once the link is up.

- **Calls** (CALL/REPLY): a request id, the rpc JSON both ways; many in flight, each answered when done.
- **Events** (EVENTS): one-way and in order (the link is one ordered byte stream).
- **Streams** (OPEN/ACCEPT|REFUSE, then BINARY/TEXT/CLOSE): a relayed exec websocket, its messages
  carried as bytes (no websocket framing between members). Each direction of a stream has a window of
  ``WINDOW`` bytes: the sender waits for CREDIT from the reader once it has that much unread in flight,
  so a slow client slows its command and the link never buffers more than a window per stream; the
  connection's reader therefore never waits on a stream and one slow stream never stalls the others.

Either side may use a link (the dialer's ids are odd, the acceptor's even), so a pair of members
normally shares one. Losing the connection fails every call in flight (``Unavailable``) and ends every
stream as abnormal (``receive()`` answers None, ``abnormal`` is set)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from core import errors
from core.channel import ChannelClosed, Receiver
from core.errors import ApiError, Unavailable
from core.muxframe import CLOSE, CREDIT, MAX_PAYLOAD, STREAM_KINDS, Decoder, FrameError, Kind, frame, header

log = logging.getLogger(__name__)

ALPN = "execbroker-link/1"
WINDOW = 4 << 20  # unread bytes one direction of a stream may have in flight
MAX_STREAMS = 32768  # streams open on one link at once
MAX_SERVED_CALLS = 2048  # calls one link may have this member running at once
MAX_SERVED_WAITS = 16384  # ... and, apart from those, waits for an operation (each only an awaited future)
LONG_CALLS = frozenset({"wait_operation"})
OPEN_TIMEOUT = 10.0
KEEPALIVE = (5, 2, 3)  # idle seconds, interval, probes: a silent peer is lost after ~11 s
USER_TIMEOUT_MS = 15_000  # data unacknowledged this long: the peer is gone
SOCKET_BUFFER = 4 << 20  # the link socket's kernel buffers, and what its transport holds before pausing  # seconds for the owner to accept or refuse a stream


class TooLarge(ApiError):
    """Something too big for one frame of the link: refused here, for this request only."""

    status = 413


class Service(Protocol):
    """What a member serves to its peers over the link."""

    async def call(self, peer: str, method: str, args: Any) -> dict[str, Any]: ...

    def events(self, peer: str, batch: Any) -> None: ...

    async def open(self, peer: str, request: dict[str, Any], stream: MuxStream,
                   accept: Callable[[], None]) -> None:
        """Claim what ``request`` names (an ApiError is the refusal), ``accept()``, then serve ``stream``."""


class MuxStream:
    """One relayed websocket on a link: a ``core.channel.Channel`` and a ``core.channel.Port``."""

    def __init__(self, conn: MuxConnection, ident: int) -> None:
        self._conn = conn
        self.ident = ident
        self._inbox: collections.deque[tuple[bytes | str, int]] = collections.deque()  # message, its bytes
        self._inbox_bytes = 0
        self._unacked = 0  # consumed, not yet granted back to the sender
        self._reader: asyncio.Future[None] | None = None
        self._credit = WINDOW
        self._writer: asyncio.Future[None] | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.local_closed = False
        self.remote_closed = False
        self.abnormal = False  # the link was lost, or the peer closed with an error code
        self.close_code: int | None = None
        self._receiver: Receiver | None = None  # Port: where messages go (else the inbox, for receive())
        self._held = False
        self._told_end = False
        self._drained: list[Callable[[], None]] = []

    # -- Channel ----------------------------------------------------------------------------------------
    async def receive(self) -> bytes | str | None:
        while not self._inbox:
            if self.remote_closed or self.local_closed:
                return None
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        msg, size = self._inbox.popleft()
        self._inbox_bytes -= size
        self._consumed(size)
        return msg

    async def send_bytes(self, data: bytes) -> None:
        await self._send(Kind.BINARY, data)

    async def send_text(self, text: str) -> None:
        await self._send(Kind.TEXT, text.encode())

    async def close(self, code: int = 1000) -> None:
        self.shut(code)

    # -- Port -------------------------------------------------------------------------------------------
    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._pass_on()

    def pause(self) -> None:
        self._held = True

    def resume(self) -> None:
        self._held = False
        self._pass_on()

    def offer(self, data: bytes | str) -> bool:
        if self.local_closed or self.remote_closed:
            return True  # gone: dropped
        kind, payload = (Kind.TEXT, data.encode()) if isinstance(data, str) else (Kind.BINARY, data)
        self._credit -= len(payload)  # the caller offers nothing more on False: at most one message past
        self._conn.send(kind, self.ident, payload)
        return self._credit > 0 and self._conn.writable

    def when_drained(self, callback: Callable[[], None]) -> None:
        if self.local_closed or self.remote_closed or (self._credit > 0 and self._conn.writable):
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._drained.append(callback)
            self._conn.wants_drain(self)

    def shut(self, code: int = 1000) -> None:
        if self.local_closed:
            return
        self.local_closed = True
        if not self.remote_closed:
            self._conn.send(Kind.CLOSE, self.ident, CLOSE.pack(code))
        self._conn.forget_stream(self.ident)
        self._wake()

    def _pass_on(self) -> None:
        while self._inbox and not self._held and self._receiver is not None:
            msg, size = self._inbox.popleft()
            self._inbox_bytes -= size
            self._consumed(size)
            self._receiver(msg)
        if (not self._inbox and (self.remote_closed or self.local_closed) and not self._told_end
                and self._receiver is not None):
            self._told_end = True
            self._receiver(None)

    def _consumed(self, size: int) -> None:
        """Read by our side: once a quarter window is, the sender gets it back as credit."""
        self._unacked += size
        if self._unacked >= WINDOW // 4 and not self.remote_closed:
            self._conn.send(Kind.CREDIT, self.ident, CREDIT.pack(self._unacked))
            self._unacked = 0

    def drained(self) -> None:
        """The link writes again, or credit came back: callers of ``when_drained`` go on."""
        if self._drained and (self.local_closed or self.remote_closed or (self._credit > 0 and self._conn.writable)):
            callbacks, self._drained = self._drained, []
            for callback in callbacks:
                callback()

    # -- the connection's side ---------------------------------------------------------------------------
    async def _send(self, kind: Kind, payload: bytes) -> None:
        while self._credit <= 0 and not (self.local_closed or self.remote_closed):
            self._writer = asyncio.get_running_loop().create_future()
            try:
                await self._writer
            finally:
                self._writer = None
        if self.local_closed or self.remote_closed:
            raise ChannelClosed("the stream is closed")
        self._credit -= len(payload)
        self._conn.send(kind, self.ident, payload)
        await self._conn.drain()

    def deliver(self, msg: bytes | str, size: int) -> None:
        """A message of ``size`` bytes on the wire (what the sender counted against its window)."""
        if self.local_closed:
            return
        if self._receiver is not None and not self._held and not self._inbox:
            self._consumed(size)
            self._receiver(msg)
            return
        self._inbox.append((msg, size))
        self._inbox_bytes += size
        if self._inbox_bytes > WINDOW + (16 << 20):
            raise FrameError(f"stream {self.ident}: the peer sent past its window")
        self._wake_reader()

    def grant(self, n: int) -> None:
        self._credit += n
        if self._writer is not None and not self._writer.done() and self._credit > 0:
            self._writer.set_result(None)
        self.drained()

    def ended(self, code: int | None, abnormal: bool) -> None:
        self.remote_closed = True
        self.close_code = code
        self.abnormal = self.abnormal or abnormal or code not in (1000, 1001, None)
        self._wake()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _wake(self) -> None:
        self._wake_reader()
        if self._writer is not None and not self._writer.done():
            self._writer.set_result(None)
        if self._receiver is not None:
            self._pass_on()
        self.drained()


class MuxConnection(asyncio.Protocol):
    """One side of a link. ``dialer``: this member opened it (and sends HELLO first)."""

    def __init__(self, service: Service | None, dialer: bool, peer: str = "",
                 on_hello: Callable[[MuxConnection, str], None] = lambda _c, _a: None,
                 on_lost: Callable[[MuxConnection], None] = lambda _c: None) -> None:
        self._service = service
        self.dialer = dialer
        self.peer = peer  # the other member's name (the acceptor learns it from HELLO)
        self._on_hello = on_hello
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._decoder = Decoder()
        self._next = 1 if dialer else 2
        self._calls: dict[int, asyncio.Future[bytes]] = {}
        self._streams: dict[int, MuxStream] = {}
        self._served = 0
        self._waiting = 0
        self._calls_served: set[asyncio.Future[None]] = set()  # cancelled with the link
        self._streams_served: set[asyncio.Future[None]] = set()  # end by themselves: their streams end
        self._writable = asyncio.Event()
        self._writable.set()
        self._drain_waiters: set[MuxStream] = set()  # Port streams waiting for the link to write again
        self.lost = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # a 1 MiB message leaves in one send()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            with contextlib.suppress(OSError, AttributeError):  # a peer gone silent is a lost link
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE[0])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE[1])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE[2])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        transport.set_write_buffer_limits(high=SOCKET_BUFFER, low=SOCKET_BUFFER // 4)

    def data_received(self, data: bytes) -> None:
        try:
            for kind, ident, payload in self._decoder.feed(data):
                self._dispatch(kind, ident, payload)
        except Exception as exc:  # noqa: BLE001 - whatever a frame broke, only this link ends
            log.error("member link to %s: protocol error, link closed: %s: %s", self.peer or "?",
                      type(exc).__name__, exc)
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._writable.set()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(self._lost_error())
        self._calls.clear()
        for task in list(self._calls_served):  # nobody is left to answer
            task.cancel()
        for stream in list(self._streams.values()):
            if not stream.opened.done():
                stream.opened.set_exception(self._lost_error())
            stream.ended(None, abnormal=True)
        self._streams.clear()
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()
        waiting, self._drain_waiters = self._drain_waiters, set()
        for stream in waiting:
            stream.drained()

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    def wants_drain(self, stream: MuxStream) -> None:
        if not self.writable:
            self._drain_waiters.add(stream)

    # -- sending ---------------------------------------------------------------------------------------------
    def send(self, kind: Kind, ident: int, payload: bytes = b"") -> None:
        """Write one frame. A payload past its kind's bound is the caller's error (``TooLarge``): the peer
        would end the whole link on it."""
        if len(payload) > MAX_PAYLOAD[kind]:
            raise TooLarge(f"a {kind.name} of {len(payload)} bytes is over the member link's "
                           f"{MAX_PAYLOAD[kind]}-byte bound")
        if self.lost or self._transport is None:
            return
        if len(payload) > 65536:  # no copy of a big payload into the header's buffer
            self._transport.write(header(kind, ident, len(payload)))
            self._transport.write(payload)
        else:
            self._transport.write(frame(kind, ident, payload))

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()
        if self.lost:
            raise ChannelClosed("the member link was lost")

    def _lost_error(self) -> Unavailable:
        return Unavailable(f"Cluster member {self.peer} is unreachable: the member link was lost")

    def _ident(self) -> int:
        while True:
            ident = self._next
            self._next = self._next + 2 if self._next < 0xFFFFFFF0 else (1 if self.dialer else 2)
            if ident not in self._calls and ident not in self._streams:
                return ident

    def hello(self, name: str, address: str) -> None:
        self.send(Kind.HELLO, 0, json.dumps({"member": name, "address": address}).encode())

    async def call(self, method: str, args: Any, timeout: float | None = None) -> bytes:
        """The peer's raw REPLY to ``method(*args)``."""
        if self.lost:
            raise self._lost_error()
        body = json.dumps({"method": method, "args": args}).encode()
        ident = self._ident()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._calls[ident] = fut
        try:
            self.send(Kind.CALL, ident, body)
            await self.drain()
            return await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
        except asyncio.TimeoutError:
            raise Unavailable(f"Cluster member {self.peer} did not answer within {timeout} s") from None
        except ChannelClosed:
            raise self._lost_error() from None
        finally:
            self._calls.pop(ident, None)

    async def send_events(self, batch: str) -> None:
        if self.lost:
            raise self._lost_error()
        try:
            self.send(Kind.EVENTS, 0, batch.encode())
        except TooLarge as exc:
            raise Unavailable(f"events for cluster member {self.peer} dropped: {exc.message}") from None
        try:
            await self.drain()
        except ChannelClosed:
            raise self._lost_error() from None

    async def open_stream(self, request: dict[str, Any]) -> MuxStream:
        """A stream the peer accepted; its refusal is raised as the same ApiError."""
        if self.lost:
            raise self._lost_error()
        if len(self._streams) >= MAX_STREAMS:
            raise Unavailable(f"Too many relayed sockets to cluster member {self.peer} at once; try again")
        ident = self._ident()
        stream = self._streams[ident] = MuxStream(self, ident)
        self.send(Kind.OPEN, ident, json.dumps(request).encode())
        try:
            await asyncio.wait_for(asyncio.shield(stream.opened), OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            await stream.close(1011)
            raise Unavailable(f"Cluster member {self.peer} did not open the socket within {OPEN_TIMEOUT} s") from None
        except BaseException:
            await stream.close(1011)
            raise
        return stream

    def forget_stream(self, ident: int) -> None:
        self._streams.pop(ident, None)

    def transport_info(self, name: str) -> Any:
        return self._transport.get_extra_info(name) if self._transport is not None else None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def streams(self) -> int:
        return len(self._streams)

    # -- receiving -------------------------------------------------------------------------------------------
    def _dispatch(self, kind: Kind, ident: int, payload: bytes) -> None:
        if kind in STREAM_KINDS:
            stream = self._streams.get(ident)
            if stream is None:
                return  # closed here already: what was in flight is dropped
            if kind is Kind.BINARY:
                stream.deliver(payload, len(payload))
            elif kind is Kind.TEXT:
                stream.deliver(payload.decode(), len(payload))
            elif kind is Kind.CREDIT:
                stream.grant(CREDIT.unpack(payload)[0])
            elif kind is Kind.CLOSE:
                code = CLOSE.unpack(payload)[0] if payload else None
                if not stream.opened.done():
                    stream.opened.set_exception(Unavailable(f"Cluster member {self.peer} closed the socket"))
                stream.ended(code, abnormal=False)
            elif kind is Kind.ACCEPT:
                if not stream.opened.done():
                    stream.opened.set_result(None)
            else:  # REFUSE
                status, message = json.loads(payload)
                if not stream.opened.done():
                    stream.opened.set_exception(errors.from_status(str(message), int(status)))
                self._streams.pop(ident, None)
            return
        if kind is Kind.REPLY:
            fut = self._calls.get(ident)
            if fut is not None and not fut.done():
                fut.set_result(payload)
            return
        if kind is Kind.HELLO:
            hello = json.loads(payload)
            self.peer = str(hello["member"])
            self._on_hello(self, str(hello["address"]))
            return
        if not self.peer:
            raise FrameError(f"{kind.name} before HELLO")
        if self._service is None:
            raise FrameError(f"{kind.name}: this side serves nothing")
        if kind is Kind.EVENTS:
            self._service.events(self.peer, json.loads(payload))
        elif kind is Kind.CALL:
            self._serve_call(ident, payload)
        elif kind is Kind.OPEN:
            self._serve_open(ident, payload)

    def _serve_call(self, ident: int, payload: bytes) -> None:
        body = json.loads(payload)
        if not isinstance(body, dict):
            raise FrameError("a CALL is a JSON object")
        method = str(body.get("method", ""))
        waits = method in LONG_CALLS
        if (self._waiting >= MAX_SERVED_WAITS) if waits else (self._served >= MAX_SERVED_CALLS):
            self.send(Kind.REPLY, ident, json.dumps(
                {"error": [503, f"Cluster member {self.peer} has too many calls in flight here; try again"]}).encode())
            return
        assert self._service is not None
        if waits:
            self._waiting += 1
        else:
            self._served += 1
        self._spawn(self._run_call(ident, self._service.call(self.peer, method, body.get("args")), waits),
                    self._calls_served)

    async def _run_call(self, ident: int, reply: Awaitable[dict[str, Any]], waits: bool) -> None:
        try:
            try:
                self.send(Kind.REPLY, ident, json.dumps(await reply).encode())
            except TooLarge as exc:
                self.send(Kind.REPLY, ident, json.dumps({"error": [500, exc.message]}).encode())
            except Exception as exc:  # noqa: BLE001 - the caller gets an error, the link goes on
                log.exception("member call from %s failed", self.peer)
                self.send(Kind.REPLY, ident, json.dumps({"error": [500, f"internal error: {type(exc).__name__}"]}).encode())
            with contextlib.suppress(ChannelClosed):
                await self.drain()  # a peer that reads slowly holds its calls' slots, not our memory
        finally:
            if waits:
                self._waiting -= 1
            else:
                self._served -= 1

    def _serve_open(self, ident: int, payload: bytes) -> None:
        if ident in self._streams or len(self._streams) >= MAX_STREAMS:
            self.send(Kind.REFUSE, ident, json.dumps([503, "Too many relayed sockets at once"]).encode())
            return
        request = json.loads(payload)
        stream = self._streams[ident] = MuxStream(self, ident)
        stream.opened.set_result(None)
        assert self._service is not None
        self._spawn(self._run_open(stream, self._service, request), self._streams_served)

    async def _run_open(self, stream: MuxStream, service: Service, request: dict[str, Any]) -> None:
        accepted = False

        def accept() -> None:
            nonlocal accepted
            accepted = True
            self.send(Kind.ACCEPT, stream.ident)

        failed = False
        try:
            await service.open(self.peer, request, stream, accept)
        except ApiError as exc:
            if not accepted:
                self._streams.pop(stream.ident, None)
                self.send(Kind.REFUSE, stream.ident, json.dumps([exc.status, exc.message[:4096]]).encode())
                return
            log.warning("relayed socket from %s: %s", self.peer, exc.message)
            failed = True
        except Exception:  # noqa: BLE001
            log.exception("relayed socket from %s failed", self.peer)
            if not accepted:
                self._streams.pop(stream.ident, None)
                self.send(Kind.REFUSE, stream.ident, json.dumps([500, "internal error"]).encode())
                return
            failed = True
        await stream.close(1011 if failed or stream.abnormal else 1000)

    @staticmethod
    def _spawn(coro: Awaitable[None], into: set[asyncio.Future[None]]) -> None:
        task = asyncio.ensure_future(coro)
        into.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(into.discard)
