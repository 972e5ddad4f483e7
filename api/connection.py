"""Each connection's facts and bounds, at the protocol level, before any route runs.

uvicorn copies a per-connection ``app_state`` into every request's and websocket's ``scope["state"]``; the
protocol subclasses here give each connection its own, holding a ``Peer`` (which listener, the unix peer's
uid and groups or the TLS client certificate's fingerprint, and how to cut the connection), and they
bound what a connection may do: a cap on open connections per listener (a 503 in the Incus envelope past
it) and a deadline for each request's headers (a connection that sends no complete request in time is
closed). TLS itself is ``api/tls.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from api import envelope
from api.fastpath import FastCycle, FastPath
from api.tls import TLSConnection, TLSTransport
from core import aio, workers

Listener = Literal["unix", "https", "member", "worker"]
# (first request's target, the bytes read so far, the transport) -> True when another process took the
# connection (api/handoff.py)
Route = Callable[[bytes, bytes, asyncio.Transport], bool]
SEND_BUFFER = 4 << 20  # a 1 MiB output frame leaves in one send(): no partial writes, copies, wake-ups
REQUEST_TIMEOUT = 5.0  # seconds from connect (or a request's first byte) to its complete headers
DEADLINE_PERIOD = 0.25  # how often request deadlines and keep-alive timeouts are checked (how late they may fire)
CLOSE_GRACE = 30.0  # seconds a closed websocket's client has to read what was sent before the close frame
SO_PEERGROUPS = 59
_default_headers: list[object] = [None, b""]  # the server state's header list, and it as bytes
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    listener: Listener
    uid: int | None = None  # unix listener: the peer's uid and groups at connect (SO_PEERCRED/PEERGROUPS)
    gids: frozenset[int] = frozenset()
    fingerprint: str = ""  # TLS listeners: the client certificate's SHA-256, "" without one
    certificate: x509.Certificate | None = field(default=None, compare=False, repr=False)


@dataclass
class Limits:
    """Bounds shared by a listener's connections; the server config may change them at run time."""

    max_connections: int = 10_000
    request_timeout: float = REQUEST_TIMEOUT
    max_header_bytes: int = 64 << 10  # request line and headers of one request


def _unix_credentials(sock: socket.socket) -> tuple[int, frozenset[int]]:
    _pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    size = 256
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
            break
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= 65536:
                raw = b""
                break
            size *= 4
    groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]) if raw else ()
    return uid, frozenset((gid, *groups))


def peer_of(transport: asyncio.Transport, listener: Listener) -> Peer:
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
    if listener in ("unix", "worker") and sock is not None and sock.family == socket.AF_UNIX:
        uid, gids = _unix_credentials(sock)
        return Peer(listener, uid=uid, gids=gids)
    return Peer(listener, fingerprint=transport.get_extra_info("peer_fingerprint") or "",
                certificate=transport.get_extra_info("peer_certificate"))


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (the C parser: h11 was ~8% of an exec's CPU) with a Peer in its
    state, a connection cap, and a deadline and a size bound for each request's line and headers."""

    def __init__(self, *, listener: Listener, limits: Limits, route: Route | None = None, preface: bytes = b"",
                 fast: FastPath | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.listener = listener
        self.limits = limits
        self.fast = fast  # the exec hot path (api/fastpath.py), served here without the ASGI stack
        self._route = route  # may hand the connection to another process on its first request line
        self._sniffed = b""  # what was read of the first request while its line was incomplete
        self._preface = preface  # what another process read of this connection before handing it over
        self._deadline: float | None = None  # when the current request's headers must be complete
        self._idle_since: float | None = None  # kept alive with no request since (uvicorn's keep-alive timeout)
        self._ticker = aio.ticker(DEADLINE_PERIOD)
        self._in_headers = True  # no request yet, or one whose headers are not complete
        self._header_bytes = 0  # received of them so far
        self._tail = b""  # the last bytes of that, where a header end may begin

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.app_state = {**self.app_state, "peer": peer_of(transport, self.listener)}
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            body = envelope.error(503, f"Too many open connections (limit {self.limits.max_connections})").body
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self._arm()
        if self._preface:
            data, self._preface = self._preface, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._route is not None:
            data = self._sniff(data)
            if not data:
                return
        if self._in_headers:  # a request's line and headers (or the wait for them): bounded before parsing
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            size = self._header_bytes + (end + 4 - len(self._tail) if end >= 0 else len(data))
            if size > self.limits.max_header_bytes:
                return self._refuse_headers()
            self._header_bytes += len(data)
            self._tail = window[-3:]
        super().data_received(data)

    def _sniff(self, data: bytes) -> bytes:
        """The first request line decides which process serves the connection: ``route`` takes it
        (and closes our end) or leaves it here; returns what this protocol should parse now."""
        data = self._sniffed + data
        line = workers.request_line(data)
        if line is None and len(data) < workers.MAX_REQUEST_LINE and b"\r\n" not in data:
            self._sniffed = data
            return b""
        route, self._route, self._sniffed = self._route, None, b""
        if line is not None and self.transport is not None and route is not None and route(line[1], data, self.transport):
            self._disarm()
            return b""
        return data

    def _refuse_headers(self) -> None:
        self._disarm()
        self._in_headers = False
        body = envelope.error(431, f"Request header fields too large (limit {self.limits.max_header_bytes} bytes)").body
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refused, in the Incus error envelope (uvicorn's is plain text)."""
        body = envelope.error(400, msg).body
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"x-content-type-options: nosniff\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_headers = False
        if (self.fast is not None and (self.cycle is None or self.cycle.response_complete)
                and not self.parser.should_upgrade()):
            method = self.parser.get_method()
            self.scope["method"] = method.decode("ascii")
            cycle = self.fast.take(self, method, self.url,
                                   self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive())
            if cycle is not None:
                self.cycle = cycle  # type: ignore[assignment]
                return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if isinstance(self.cycle, FastCycle):
            self.cycle.feed(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if isinstance(self.cycle, FastCycle):
            self.cycle.complete()
        else:
            super().on_message_complete()
        self._in_headers, self._header_bytes, self._tail = True, 0, b""  # the next request's

    def handle_websocket_upgrade(self) -> None:
        self._ticker.discard(self)  # the websocket keeps its own time
        if self.fast is None or not self.fast.upgrade(self, self.url):
            super().handle_websocket_upgrade()

    # -- what the fast path writes with --------------------------------------------------------------------
    def header(self, name: bytes) -> bytes | None:
        """The current request's header ``name`` (lower case), the first of them."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @staticmethod
    def status_line(status: int) -> bytes:
        return STATUS_LINE[status]

    def default_headers(self) -> bytes:
        """uvicorn's ``date`` and ``server`` headers (a new list each second), as bytes."""
        current = self.server_state.default_headers
        if _default_headers[0] is not current:
            _default_headers[:] = [current, b"".join(b"%s: %s\r\n" % pair for pair in current)]
        return _default_headers[1]  # type: ignore[return-value]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._ticker.discard(self)
        super().connection_lost(exc)

    # -- deadlines, on the loop's shared ticker (no timer handle per connection or request) ----------------
    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.time() + self.limits.request_timeout
            self._ticker.add(self)

    def _disarm(self) -> None:
        self._deadline = None

    def tick(self, now: float) -> None:
        if self.transport is None or self.transport.is_closing():
            self._ticker.discard(self)
        elif self._deadline is not None and now >= self._deadline:  # no complete headers in time
            self._deadline = None
            self.transport.close()
        elif self._idle_since is not None and now - self._idle_since >= self.timeout_keep_alive:
            self._idle_since = None
            self.transport.close()

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timeout on the ticker instead of a timer handle."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()
            self._ticker.add(self)

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None


class EdgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, for the websockets the fast path does not serve (a worker's proxied
    events stream, an upgrade to no route); the connection's state comes from the HTTP protocol it
    upgrades."""

    _pong_paused = False  # reading stopped until the pongs written so far are sent (handle_ping)
    _cut: asyncio.TimerHandle | None = None  # close_now's cut-off of a client that does not read

    def close_now(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason``, whatever the route is doing (even waiting to send to a
        client that reads nothing): the close frame goes after what the transport holds, and a client
        that has not read up to it ``CLOSE_GRACE`` seconds later is cut off."""
        with contextlib.suppress(Exception):
            if self.handshake_complete and not self.transport.is_closing():
                self.conn.send_close(code, reason)
                self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()
        if self._cut is None:
            self._cut = self.loop.call_later(CLOSE_GRACE, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        # a transport's abort() after its connection is gone raises (its loop is None by then)
        if self._cut is not None:
            self._cut.cancel()
        super().connection_lost(exc)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # a refusal (send_denial_response) answers the handshake; uvicorn leaves it "incomplete" and
            # logs "ASGI callable returned without completing handshake." as an ERROR for every one
            self.handshake_complete = True

    def send_receive_event_to_app(self) -> None:
        """A text message that is not UTF-8 closes the socket with 1007, as uvicorn does, but without
        uvicorn's ERROR and traceback in the agent's log: the error is the client's, and any client could
        fill the log with them (websockets >= 14 leaves the UTF-8 check to uvicorn)."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                self.conn.send_close(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_ping(self) -> None:
        """Each ping's pong is written at once; a client that sends pings without reading the pongs
        would have the transport hold them all (measured: 300 MiB held for 300 MiB of pings). So while
        the transport is over its high-water mark, reading stops, until ``resume_writing``."""
        super().handle_ping()
        if not self.writable.is_set() and not self.transport.is_closing():
            self._pong_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._pong_paused:
            self._pong_paused = False
            if not self.read_paused:  # else uvicorn resumes when the route has taken its message
                self.transport.resume_reading()

    def revoke(self, reason: str) -> None:
        """Close with 1008 (policy violation) and ``reason``, whatever the route is doing."""
        self.close_now(1008, reason)


class ClientConnections:
    """The open HTTPS connections of each client certificate, so that a revoked certificate's
    connections (kept-alive requests, exec and event websockets) are cut at once."""

    def __init__(self) -> None:
        self._by_fingerprint: dict[str, weakref.WeakSet[TLSTransport]] = {}

    def add(self, fingerprint: str, transport: TLSTransport) -> None:
        if fingerprint:
            self._by_fingerprint.setdefault(fingerprint, weakref.WeakSet()).add(transport)

    def cut(self, fingerprint: str, reason: str = "Certificate revoked") -> int:
        cut = 0
        for transport in list(self._by_fingerprint.pop(fingerprint, ())):
            if transport.is_closing():
                continue
            revoke = getattr(transport.get_protocol(), "revoke", None)  # a websocket (either kind)
            if revoke is not None:
                revoke(reason)
            else:
                transport.close()
            cut += 1
        return cut


def http_protocol(listener: Listener, limits: Limits, route: Route | None = None,
                  fast: FastPath | None = None) -> Callable[..., EdgeHttpProtocol]:
    """A protocol factory for uvicorn (which calls it with its own keyword arguments)."""
    return functools.partial(EdgeHttpProtocol, listener=listener, limits=limits, route=route, fast=fast)


def tls_http_protocol(listener: Listener, limits: Limits, context: Callable[[], Any],
                      accept: Callable[[str, TLSTransport], bool],
                      fast: FastPath | None = None) -> Callable[..., TLSConnection]:
    """A protocol factory for uvicorn: TLS (``context()`` is read per connection, so a new certificate
    applies at once) around the edge HTTP protocol; ``accept(fingerprint, transport)`` vets the client."""
    inner = http_protocol(listener, limits, fast=fast)

    def factory(**kwargs: Any) -> TLSConnection:
        return TLSConnection(context(), inner(**kwargs), accept, limits.request_timeout)

    return factory
