"""A lean async Incus exec client for measurements: raw HTTP/1.1 over the unix socket (keep-alive pool) and
the ``websockets`` client with compression off. Kept minimal so the bench process spends as little CPU as
possible per exec (it shares two cores with the agent it measures).

Exec frame conventions: binary frames are data, a text frame is the end-of-stream barrier.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed

from client.exec_session import open_sockets
from node_agent.runtime.unixsock import open_unix


class WireError(Exception):
    pass


@dataclass
class HttpResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


KEEPALIVE_IDLE = 3.0  # reuse an idle connection only this long (uvicorn closes them after 5 s)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[HttpResponse, bool]:
    """One response; returns it and whether the connection may be reused."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
        return HttpResponse(status, body), False
    return HttpResponse(status, body), headers.get("connection", "").lower() != "close"


class Api:
    """REST and websockets on one server socket. HTTP connections are pooled (one request each at a time)."""

    def __init__(self, socket_path: str, pool: bool = True) -> None:
        self.socket_path = socket_path
        self.pool = pool  # False: a connection per request (each first request free to land on any process)
        self._idle: list[_Conn] = []

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> HttpResponse:
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: unix.socket\r\nUser-Agent: execbroker-bench\r\n"
                f"Content-Length: {len(payload)}\r\n")
        if body is not None:
            head += "Content-Type: application/json\r\n"
        data = head.encode() + b"\r\n" + payload
        while True:
            conn = self._pooled()
            fresh = conn is None
            if conn is None:
                conn = _Conn(*await asyncio.open_unix_connection(sock=await open_unix(self.socket_path),
                                                                 limit=1 << 22))
            try:
                conn.writer.write(data)
                resp, reusable = await asyncio.wait_for(_read_response(conn.reader), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                conn.close()
                if fresh:
                    raise
                continue  # a pooled connection the server closed meanwhile: try the next, or a new one
            except BaseException:
                conn.close()
                raise
            if reusable and self.pool:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            return resp

    def _pooled(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < KEEPALIVE_IDLE and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> dict[str, Any]:
        """Request and decode the envelope; an error envelope raises WireError."""
        resp = await self.request(method, path, body, timeout)
        doc = resp.json()
        if resp.status >= 400 or doc.get("type") == "error":
            raise WireError(f"{method} {path}: HTTP {resp.status}: {doc.get('error')}")
        return doc

    async def get(self, path: str) -> Any:
        return (await self.call("GET", path))["metadata"]

    async def wait(self, op_id: str, timeout: int = 60) -> dict[str, Any]:
        return (await self.call("GET", f"/1.0/operations/{op_id}/wait?timeout={timeout}",
                                timeout=timeout + 10))["metadata"]

    async def finish(self, doc: dict[str, Any], timeout: int = 60) -> dict[str, Any]:
        """An async envelope → its finished operation; raise WireError on failure."""
        op_id = doc["operation"].rsplit("/", 1)[-1]
        op = await self.wait(op_id, timeout)
        if op.get("status_code", 0) >= 400 or op.get("err"):
            raise WireError(f"operation {op_id}: {op.get('err')}")
        return op

    async def websocket(self, path: str) -> ClientConnection:
        return await unix_connect(
            sock=await open_unix(self.socket_path), uri="ws://unix.socket" + path, compression=None, max_size=None,
            ping_interval=None, close_timeout=2, open_timeout=30, user_agent_header="execbroker-bench",
        )

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


@dataclass
class Exec:
    """A started exec with its websockets connected (control only when interactive)."""

    api: Api
    op_id: str
    ws: dict[str, ClientConnection] = field(default_factory=dict)

    async def wait(self, timeout: int = 60) -> dict[str, Any]:
        return await self.api.wait(self.op_id, timeout)

    def abort(self) -> None:
        for ws in self.ws.values():
            ws.transport.abort()
        self.ws.clear()

    async def close(self) -> None:
        for ws in list(self.ws.values()):
            try:
                await ws.close()
            except Exception:  # noqa: BLE001 - closing anyway
                ws.transport.abort()
        self.ws.clear()


async def start_exec(api: Api, instance: str, argv: list[str], *, interactive: bool = False,
                     width: int = 80, height: int = 24) -> Exec:
    """POST with wait-for-websocket and connect its sockets: 0,1,2 (as pylxd); interactive: control, then 0
    (as the Go client). The command starts once the last required socket is in."""
    body = {"command": argv, "wait-for-websocket": True, "interactive": interactive, "environment": {},
            "width": width if interactive else 0, "height": height if interactive else 0}
    doc = await api.call("POST", f"/1.0/instances/{instance}/exec", body)
    op = doc["metadata"]
    fds = op["metadata"]["fds"]
    ex = Exec(api, op["id"])
    url = f"/1.0/operations/{op['id']}/websocket?secret="
    try:
        if interactive:
            ex.ws["control"] = await api.websocket(url + fds["control"])
        await open_sockets(api.websocket, url, fds, ["0"] if interactive else ["0", "1", "2"], ex.ws)
    except BaseException:
        ex.abort()
        raise
    return ex


async def drain(ws: ClientConnection, sink: Callable[[bytes], object] | None = None) -> int:
    """Receive binary frames until the barrier (or close); returns the byte count."""
    n = 0
    try:
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                return n
            n += len(msg)
            if sink is not None:
                sink(msg)
    except ConnectionClosed:
        return n


@dataclass
class ExecOutcome:
    code: int | None
    err: str
    stdout: int
    stderr: int
    stderr_text: bytes = b""


async def run_exec(api: Api, instance: str, argv: list[str], stdin: bytes | memoryview | None = None,
                   chunk: int = 1 << 20, repeat: int = 1) -> ExecOutcome:
    """A whole non-interactive exec: stdin (``stdin`` sent ``repeat`` times in ``chunk`` frames, then the
    barrier), outputs read to their barriers, then the operation's ``return``."""
    ex = await start_exec(api, instance, argv)
    err_parts: list[bytes] = []
    try:
        async def feed() -> None:
            ws = ex.ws["0"]
            try:
                if stdin is not None:
                    view = memoryview(stdin)
                    for _ in range(repeat):
                        for i in range(0, len(view), chunk):
                            await ws.send(view[i:i + chunk], text=False)
                await ws.send("")
            except ConnectionClosed:
                pass

        _, n_out, n_err = await asyncio.gather(
            feed(), drain(ex.ws["1"]), drain(ex.ws["2"], err_parts.append))
        op = await ex.wait()
    finally:
        ex.abort()
    ret = (op.get("metadata") or {}).get("return")
    return ExecOutcome(ret, op.get("err") or "", n_out, n_err, b"".join(err_parts))
