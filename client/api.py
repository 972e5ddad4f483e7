"""Small async client for the Incus/LXD REST API over a unix socket, with exec and events.

REST goes through httpx; websockets use the ``websockets`` asyncio client with compression off (permessage-deflate
makes bulk exec traffic ~30x slower) and without client pings (the server pings; missing pongs are never fatal).

Exec frame conventions (both directions): a binary frame is data, any text frame (normally empty) is the
end-of-stream barrier. See docs in /work/shared/reference/exec-api-spec.md §5 and §8.1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from client.exec_session import ExecResult, ExecSession, Sink, Stdin
from node_agent.runtime.unixsock import open_unix

DEFAULT_DIR = "/var/lib/execbroker"


def default_socket_path() -> str:
    """``$EXECBROKER_SOCKET``, else ``$EXECBROKER_DIR/unix.socket`` (dir defaults to /var/lib/execbroker)."""
    explicit = os.environ.get("EXECBROKER_SOCKET")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("EXECBROKER_DIR") or DEFAULT_DIR, "unix.socket")


class ClientError(Exception):
    """An error envelope from the server (or a failed websocket upgrade): HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class OperationError(ClientError):
    """A background operation ended in Failure/Cancelled; ``operation`` is its final object."""

    def __init__(self, operation: Mapping[str, Any]) -> None:
        super().__init__(int(operation.get("status_code") or 400), operation.get("err") or "Operation failed")
        self.operation = operation


class EventsClosed(ClientError):
    """The server ended an events stream abnormally (a listener too slow is dropped): its close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, f"Events stream closed by the server: {reason or f'code {code}'}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Response:
    """A parsed sync or async envelope."""

    status: int  # HTTP status
    type: str  # "sync" | "async"
    metadata: Any
    operation: str  # "/1.0/operations/<id>" for async responses, else ""

    @property
    def operation_id(self) -> str:
        return self.operation.rsplit("/", 1)[-1] if self.operation else ""


def _envelope_error(status: int, body: bytes) -> ClientError:
    try:
        doc = json.loads(body)
        message = doc.get("error") or ""
    except (ValueError, AttributeError):
        message = ""
    return ClientError(status, message or body.decode("utf-8", "replace").strip() or f"HTTP {status}")


class Client:
    """One connection pool to one server socket. Use as ``async with Client(path) as c:``."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path or default_socket_path()
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
            base_url="http://unix.socket",
            timeout=timeout,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- REST ---------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        timeout: float | None | object = httpx.USE_CLIENT_DEFAULT,
    ) -> Response:
        r = await self._http.request(method, path, json=body, params=params, timeout=timeout)  # type: ignore[arg-type]
        try:
            doc = r.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("type") == "error" or r.status_code >= 400:
            raise _envelope_error(r.status_code, r.content)
        return Response(r.status_code, doc.get("type", ""), doc.get("metadata"), doc.get("operation") or "")

    async def get(self, path: str, **params: str) -> Any:
        """GET a sync resource and return its ``metadata``."""
        return (await self.request("GET", path, params=params or None)).metadata

    async def post(self, path: str, body: Any = None) -> Response:
        return await self.request("POST", path, body)

    async def put(self, path: str, body: Any = None) -> Response:
        return await self.request("PUT", path, body)

    async def patch(self, path: str, body: Any = None) -> Response:
        return await self.request("PATCH", path, body)

    async def delete(self, path: str) -> Response:
        return await self.request("DELETE", path)

    async def wait_operation(self, op_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block on ``/1.0/operations/{id}/wait`` and return the Operation (maybe still Running on timeout)."""
        seconds = -1 if timeout is None else max(1, int(timeout + 0.999))
        r = await self.request(
            "GET", f"/1.0/operations/{op_id}/wait", params={"timeout": str(seconds)},
            timeout=None if timeout is None else timeout + 10,
        )
        return r.metadata

    async def finish(self, resp: Response, timeout: float | None = None) -> Any:
        """Sync response → its metadata. Async → wait for the operation; raise OperationError if it failed."""
        if resp.type != "async":
            return resp.metadata
        op = await self.wait_operation(resp.operation_id, timeout)
        if op.get("status_code", 0) >= 400 or op.get("err"):
            raise OperationError(op)
        return op

    # ---- websockets ---------------------------------------------------------------------------------------

    async def websocket(self, path: str) -> ClientConnection:
        """Open a websocket on the server; an HTTP error response becomes ClientError."""
        try:
            return await unix_connect(
                sock=await open_unix(self.socket_path),  # asyncio's unix connect fails silently on a full backlog
                uri="ws://unix.socket" + path,
                compression=None,
                max_size=None,
                ping_interval=None,
                close_timeout=2,
                write_limit=1 << 18,
                user_agent_header="execbroker-client",
            )
        except InvalidStatus as e:
            raise _envelope_error(e.response.status_code, e.response.body or b"") from None

    async def events(self, types: Iterable[str] = (), *, all_projects: bool = False) -> EventStream:
        """Subscribe to ``/1.0/events``; connected on return, so nothing that happens afterwards is missed."""
        query = []
        if types:
            query.append("type=" + ",".join(types))
        if all_projects:
            query.append("all-projects=true")
        return EventStream(await self.websocket("/1.0/events" + ("?" + "&".join(query) if query else "")))

    # ---- exec ---------------------------------------------------------------------------------------------

    async def exec_start(
        self,
        instance: str,
        argv: Sequence[str],
        *,
        interactive: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        user: int = 0,
        group: int = 0,
        width: int = 0,
        height: int = 0,
        stdin: Stdin = None,
        stdout_sink: Sink | None = None,
        stderr_sink: Sink | None = None,
        timeout: float | None = None,
        record: bool = False,
    ) -> ExecSession:
        """POST the exec, connect its websockets and start pumping. Returns the running session handle.

        ``stdin``: bytes or an async iterable of chunks, followed by the EOF barrier; None is an immediate EOF
        (interactive: no input and no barrier). Sinks get each output frame as it arrives; None discards
        (bytes are still counted). Interactive output all goes to stdout_sink.
        """
        body = {
            "command": list(argv),
            "wait-for-websocket": True,
            "interactive": interactive,
            "environment": dict(env or {}),
            "width": width,
            "height": height,
            "record-output": False,
            "user": user,
            "group": group,
            "cwd": cwd,
        }
        if timeout is not None:
            body["timeout"] = timeout  # extension exec_timeout
        if record:
            body["record-session"] = True  # extension exec_recording
        resp = await self.post(f"/1.0/instances/{quote(instance, safe='')}/exec", body)
        session = ExecSession(self, resp.operation_id, resp.metadata["metadata"]["fds"], interactive)
        session.recording = resp.metadata["metadata"].get("recording", "")
        try:
            await session._connect()
        except BaseException:
            await session.aclose()
            raise
        session._start(stdin, stdout_sink, stderr_sink)
        return session

    async def exec(self, instance: str, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        """``exec_start`` (same keyword arguments) and wait for the result."""
        session = await self.exec_start(instance, argv, **kwargs)
        return await session.wait()


class EventStream:
    """Events as dicts (one per text frame) until the server closes; ``async with`` closes it. A close
    other than a normal one (1000, 1001) raises ``EventsClosed``: events were missed."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return json.loads(await self._ws.recv())
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code not in (1000, 1001):
                raise EventsClosed(exc.rcvd.code, exc.rcvd.reason) from None
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._ws.close()
