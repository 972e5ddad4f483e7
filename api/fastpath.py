"""The exec hot path, served by the edge protocol itself (api/connection.py), without the ASGI stack:

* ``POST /1.0/instances/{name}/exec``, ``GET /1.0``, ``GET /1.0/operations/{id}`` and
  ``GET /1.0/operations/{id}/wait``: answered here when the request is the connection's next one (nothing
  before it still being answered) and its path is plain; otherwise FastAPI's routes (api/routes/) answer
  them, with the same front-end calls and the same texts;
* ``GET /1.0/operations/{id}/websocket`` (every exec websocket) and ``GET /1.0/events``: the handshake is
  checked and answered here; the connection then runs on ``api/wsconn.WebSocketConnection``, attached to
  its session or relayed to the member (or worker process) that runs the operation, or pushed its events
  (api/eventstream.py).

What every route has before it runs here too: the caller identified (api/auth.Identify), the request
body bound (413 past it), a worker process's choice of what it serves itself (``serves_here``: the rest
goes through FastAPI to the agent, api/proxy.py). Errors are the Incus envelope (api/envelope.py).
Measured: the ASGI layers (routing, dependency solving, nine middlewares, the websocket adapters) were
~30 % of an exec's CPU in the agent (bench/profile.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import re
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import httptools

from api import envelope
from api.auth import Denied, Identify
from api.eventstream import EventStream
from api.limits import too_large
from api.request import atoi, project_in
from api.request import offset as offset_of
from api.routes.server import server_document
from api.wsconn import MAX_MESSAGE, WebSocketConnection
from broker import relay
from core import aio
from core.errors import ApiError, BadRequest, Forbidden
from core.identity import Identity

if TYPE_CHECKING:
    from api.connection import EdgeHttpProtocol
    from broker.frontend import Frontend

log = logging.getLogger(__name__)

_EXEC = re.compile(rb"/1\.0/instances/([^/%]+)/exec")
_OPERATION = re.compile(rb"/1\.0/operations/([^/%]+)(/wait)?")
_SERVER = re.compile(rb"/1\.0")
_WEBSOCKET = re.compile(r"/1\.0/operations/([^/]+)/websocket")
EVENTS = "/1.0/events"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
JSON = b"content-type: application/json\r\n"
NOSNIFF = b"x-content-type-options: nosniff\r\n"
KEEP_ALIVE = b"connection: keep-alive\r\n"
# (method, path, query string) -> whether this process serves the request (a worker process: else the agent)
ServesHere = Callable[[str, str, bytes], bool]
Handler = Callable[["FastCycle"], Coroutine[Any, Any, None]]


def _chunk(body: bytes) -> bytes:
    """``body`` as the one chunk of a chunked response, and its end."""
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def query_of(raw: bytes) -> dict[str, str]:
    """Query parameters as Starlette reads them: blank values kept, the last of a repeated name wins."""
    return dict(urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


class FastCycle:
    """One request answered here, in the place of uvicorn's request-response cycle (the protocol's
    pipelining and keep-alive treat it like theirs: ``response_complete``, ``disconnected``,
    ``keep_alive`` and ``message_event``)."""

    def __init__(self, proto: EdgeHttpProtocol, handler: Handler, params: tuple[str, ...], query: bytes,
                 keep_alive: bool, limit: int) -> None:
        self.proto = proto
        self.handler = handler
        self.params = params
        self.query = query_of(query)
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.message_event = self  # uvicorn calls message_event.set() when the connection is lost
        self.body = bytearray()
        self.limit = limit
        self.who: Identity | None = None
        self.task: asyncio.Task[None] | None = None
        self._chunked = False

    # -- what the protocol calls --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.response_complete:
            return
        self.body += data
        if len(self.body) > self.limit:
            self.error(413, too_large(self.limit))

    def complete(self) -> None:
        if not self.response_complete:
            self.task = aio.start(self._run())

    def set(self) -> None:
        if self.disconnected and self.task is not None and not self.task.done():
            self.task.cancel()

    # -- answers ------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self.handler(self)
        except ApiError as exc:
            self.error(exc.status, exc.message)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - as FastAPI's handler of last resort: a 500 envelope
            log.exception("%s failed", self.handler.__qualname__)
            self.error(500, str(exc) or type(exc).__name__)

    def respond(self, status: int, body: bytes, headers: bytes = JSON) -> None:
        if self.response_complete or self.disconnected:
            return
        close = b"" if self.keep_alive else b"connection: close\r\n"
        self.proto.transport.write(b"".join((
            self.proto.status_line(status), self.proto.default_headers(), headers,
            b"content-length: %d\r\n" % len(body), close, b"\r\n", body)))
        self._done()

    def error(self, status: int, message: str) -> None:
        if self._chunked:  # the head went out already: all that can be said is a cut connection
            self.keep_alive = False
            self._done()
            return
        self.respond(status, envelope.dumps(envelope.error_body(status, message)), JSON + NOSNIFF)

    def start_chunked(self, headers: bytes, body: bytes | None = None) -> None:
        """A 200 whose head goes out now and whose body comes later (``end_chunked``), or at once."""
        self._chunked = True
        close = b"" if self.keep_alive else b"connection: close\r\n"
        head = b"".join((self.proto.status_line(200), self.proto.default_headers(), JSON, headers,
                         b"transfer-encoding: chunked\r\n", close, b"\r\n"))
        if body is None:
            self.proto.transport.write(head)
            return
        self.proto.transport.write(head + _chunk(body))
        self._done()

    def end_chunked(self, body: bytes) -> None:
        if self.response_complete or self.disconnected:
            return
        self.proto.transport.write(_chunk(body))
        self._done()

    def _done(self) -> None:
        self.response_complete = True
        if not self.keep_alive:
            self.proto.transport.close()
        self.proto.on_response_complete()


class FastPath:
    """The hot routes of one listener's protocol, over the front end."""

    def __init__(self, backend: Frontend, identify: Identify, max_body: int, max_message: int = MAX_MESSAGE,
                 serves_here: ServesHere | None = None) -> None:
        self.backend = backend
        self.identify = identify
        self.max_body = max_body
        self.max_message = max_message
        self.serves_here = serves_here

    # -- HTTP -----------------------------------------------------------------------------------------------
    def take(self, proto: EdgeHttpProtocol, method: bytes, url: bytes, keep_alive: bool) -> FastCycle | None:
        """The cycle of a request answered here; None leaves it to FastAPI."""
        parsed = httptools.parse_url(url)
        path = parsed.path
        handler: Handler
        if method == b"POST":
            found = _EXEC.fullmatch(path)
            if found is None:
                return None
            handler = self._exec
        elif method == b"GET":
            found = _OPERATION.fullmatch(path) or _SERVER.fullmatch(path)
            if found is None:
                return None
            handler = self._server if found.re is _SERVER else self._wait if found.group(2) else self._operation
        else:
            return None
        query = parsed.query or b""
        if self.serves_here is not None and not self.serves_here(method.decode(), path.decode(), query):
            return None
        params = tuple(g.decode() for g in found.groups() if g is not None)
        cycle = FastCycle(proto, handler, params, query, keep_alive, self.max_body)
        try:
            cycle.who = self._identify(proto, method.decode(), path.decode(), False)
        except Denied as exc:
            cycle.error(exc.status, exc.message)
            return cycle
        length = proto.header(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            cycle.error(413, too_large(self.max_body))
        elif proto.expect_100_continue:
            proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return cycle

    def _identify(self, proto: EdgeHttpProtocol, method: str, path: str, websocket: bool) -> Identity | None:
        return self.identify(proto.app_state.get("peer"), method, path, websocket, proto.header, proto.client)

    def _who(self, cycle: FastCycle) -> Identity:
        if cycle.who is None:
            raise Forbidden("not authorized")
        return cycle.who

    async def _exec(self, cycle: FastCycle) -> None:
        who = self._who(cycle)
        where = project_in(cycle.query, lambda: who, self.backend)
        assert where is not None
        op = await self.backend.exec(where, cycle.params[0], bytes(cycle.body), who)
        body, url = envelope.async_body(op)
        cycle.respond(202, body, JSON + b"location: " + url.encode() + b"\r\n")

    async def _server(self, cycle: FastCycle) -> None:
        cycle.respond(200, envelope.sync_body(server_document(self.backend, cycle.who, cycle.query.get("project"))))

    async def _operation(self, cycle: FastCycle) -> None:
        op = await self.backend.get_operation(cycle.params[0], self._who(cycle))
        cycle.respond(200, envelope.sync_body(op))

    async def _wait(self, cycle: FastCycle) -> None:
        timeout = float(atoi(cycle.query.get("timeout", "-1")))
        op_id, who = cycle.params[0], self._who(cycle)
        op = await self.backend.get_operation(op_id, who)  # 404 before the 200's head goes out
        if op["status_code"] >= 200 or timeout == 0:  # nothing to wait for: head and body in one write
            cycle.start_chunked(KEEP_ALIVE, envelope.sync_body(op))
            return
        cycle.start_chunked(KEEP_ALIVE)  # as Incus: the head at once, the body when done
        op = await self.backend.wait_operation(op_id, None if timeout < 0 else timeout, who)
        cycle.end_chunked(envelope.sync_body(op))

    # -- websockets -----------------------------------------------------------------------------------------
    def upgrade(self, proto: EdgeHttpProtocol, url: bytes) -> bool:
        """Serve an upgrade to an exec websocket; False leaves it to uvicorn (any other path, or a
        handshake that is not a valid websocket one: websockets' own refusal answers it)."""
        parsed = httptools.parse_url(url)
        path = parsed.path.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)
        found = _WEBSOCKET.fullmatch(path)
        events = path == EVENTS and (self.serves_here is None or self.serves_here("GET", path, parsed.query or b""))
        accept = _accept_key(proto.header(b"sec-websocket-key"))
        if (found is None and not events) or accept is None or proto.header(b"sec-websocket-version") != b"13" \
                or proto.scope.get("method") != "GET":
            return False
        proto.connections.discard(proto)  # the websocket counts itself once it is one
        up = Upgrade(self, proto, accept)
        query = query_of(parsed.query or b"")
        try:
            who = self._identify(proto, "GET", path, True)
            if who is None:
                raise Forbidden("not authorized")
            if events:
                self._events(up, query, who)
                return True
            assert found is not None
            op_id, secret, offset = found.group(1), query.get("secret", ""), offset_of(query.get("offset"))
            if self.backend.local.has_operation(op_id):  # ours: attached now, no turn of the loop
                up.attach(*self.backend.claim_websocket(op_id, secret, who, offset))
                return True
        except (Denied, ApiError) as exc:
            up.refuse(exc.status, exc.message)
            return True
        proto.transport.pause_reading()  # nothing more is read until the answer
        aio.start(self._elsewhere(up, op_id, secret, who, offset))
        return True

    def _events(self, up: Upgrade, query: dict[str, str], who: Identity) -> None:
        """The events websocket: the listener exists before the 101 goes out."""
        listener = self.backend.subscribe(query.get("type"), project_in(query, lambda: who, self.backend, True))
        conn = up.accept()
        if conn is None:
            self.backend.unsubscribe(listener)
            return
        EventStream(listener, conn, self.backend.unsubscribe)

    async def _elsewhere(self, up: Upgrade, op_id: str, secret: str, who: Identity, offset: int | None) -> None:
        """An operation this process does not run: another member's, or another process of this node's."""
        backend = self.backend
        try:
            owner = await backend.websocket_owner(op_id)
            if not owner:  # ours after all (its first event had not reached the lookup)
                up.attach(*backend.claim_websocket(op_id, secret, who, offset))
                return
            if not secret:
                raise BadRequest("Missing websocket secret")
            if backend.precheck_relay(op_id, secret, who):  # we forwarded it: dial while upgrading
                dialing = asyncio.ensure_future(backend.dial_owner(owner, op_id, secret, who, offset))
            else:  # dial first, so the owner's refusal is our refusal
                dialing = asyncio.get_running_loop().create_future()
                dialing.set_result(await backend.dial_owner(owner, op_id, secret, who, offset))
        except ApiError as exc:
            up.refuse(exc.status, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - the client gets the 500 the ASGI route would have given
            log.exception("exec websocket for %s", op_id)
            up.refuse(500, str(exc) or type(exc).__name__)
            return
        conn = up.accept()
        if conn is None:  # the client went away meanwhile
            dialing.cancel()
            with contextlib.suppress(BaseException):
                await (await dialing).close()
            return
        try:
            upstream = await dialing
        except ApiError:
            await conn.close(1011)
            return
        if await relay.relay(conn, upstream):
            await backend.check_owner(op_id, who)


class Upgrade:
    """One websocket handshake in progress: answered with a refusal, or accepted onto a connection."""

    def __init__(self, fast: FastPath, proto: EdgeHttpProtocol, accept_key: bytes) -> None:
        self.fast = fast
        self.proto = proto
        self.accept_key = accept_key

    def refuse(self, status: int, message: str) -> None:
        """The refusal as an HTTP answer in the envelope (spec §4.4: checks happen before the upgrade)."""
        transport = self.proto.transport
        if transport.is_closing():
            return
        body = envelope.dumps(envelope.error_body(status, message))
        transport.write(b"".join((self.proto.status_line(status), JSON, NOSNIFF,
                                  b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body)))
        transport.close()

    def accept(self) -> WebSocketConnection | None:
        """Answer 101 and switch the connection to the websocket protocol (None: it is gone)."""
        transport = self.proto.transport
        if transport.is_closing():
            return None
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                        b"sec-websocket-accept: " + self.accept_key + b"\r\n\r\n")
        conn = WebSocketConnection(transport, self.proto.connections, self.fast.max_message)
        transport.set_protocol(conn)
        transport.resume_reading()
        return conn

    def attach(self, session: Any, fd: str) -> None:
        """Accept, and hand the connection to the exec session that claimed socket ``fd``."""
        conn = self.accept()
        if conn is None:
            session.release(fd)
            return
        session.connect(fd, conn)


def _accept_key(key: bytes | None) -> bytes | None:
    """Sec-WebSocket-Accept for a client's key (RFC 6455 §4.2.2); None when the key is not 16 bytes."""
    if key is None:
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
