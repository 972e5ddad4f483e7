"""In a worker process (core/workers.py): what this process does not serve itself goes to the agent,
over the agent's worker socket (our uid only), on the caller's behalf.

Inside ``Authenticate``: the caller was identified here, and the request carries that identity in the
forwarded-identity header (a header of that name the client sent is dropped, never passed on). Bodies
stream both ways, a chunk at a time; a websocket is relayed message by message. The exec hot path
(an exec on this node's instance, this process's operations) never comes here, and a connection whose
first request is for another process's operation or for the events stream was handed to it whole
(api/handoff.py): this serves what is left, the requests that follow on a kept-alive connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api import envelope
from api.wsconn import MAX_MESSAGE as WS_MAX_MESSAGE
from core.aio import first_of
from core.identity import FORWARDED_HEADER, Identity

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"host",
                        b"proxy-connection", FORWARDED_HEADER.lower().encode()})
WS_HANDSHAKE = frozenset({b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                          b"sec-websocket-accept"})
CONNECT_TIMEOUT = 5.0


class ToAgent:
    def __init__(self, app: ASGIApp, socket_path: Path, serves_here: Callable[[Scope], bool]) -> None:
        self.app = app
        self.path = socket_path
        self.serves_here = serves_here
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)), base_url="http://agent",
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.serves_here(scope):
            return await self.app(scope, receive, send)
        who: Identity | None = scope.get("state", {}).get("identity")
        headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in HOP_BY_HOP]
        if who is not None:
            headers += [(k.lower().encode(), v.encode()) for k, v in who.header().items()]
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        if scope["type"] == "http":
            await self._http(scope, receive, send, target.decode("latin-1"), headers)
        else:
            await self._websocket(receive, send, target.decode("latin-1"), headers)

    async def _http(self, scope: Scope, receive: Receive, send: Send, target: str,
                    headers: list[tuple[bytes, bytes]]) -> None:
        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return

        request = self._client.build_request(scope["method"], target, headers=headers, content=body())
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return await envelope.error(503, f"This member's agent is not answering: {exc}")(scope, receive, send)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _websocket(self, receive: Receive, send: Send, target: str, headers: list[tuple[bytes, bytes]]) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        extra = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k.lower() not in WS_HANDSHAKE]
        try:
            upstream = await unix_connect(str(self.path), "ws://agent" + target, additional_headers=extra,
                                          compression=None, max_size=WS_MAX_MESSAGE, ping_interval=None,
                                          open_timeout=CONNECT_TIMEOUT)
        except InvalidStatus as exc:  # the agent's refusal is ours
            await send({"type": "websocket.http.response.start", "status": exc.response.status_code,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "websocket.http.response.body", "body": exc.response.body or b""})
            return
        except (OSError, TimeoutError) as exc:
            response = envelope.error(503, f"This member's agent is not answering: {exc}")
            await send({"type": "websocket.http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "websocket.http.response.body", "body": response.body})
            return
        await send({"type": "websocket.accept"})
        try:
            await first_of(_to_client(upstream, send), _to_agent(receive, upstream))
        finally:
            code = upstream.close_code or 1000
            await upstream.close()
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code})

    async def aclose(self) -> None:
        await self._client.aclose()


async def _to_client(upstream: ClientConnection, send: Send) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for msg in upstream:
            await send({"type": "websocket.send", **({"bytes": msg} if isinstance(msg, bytes) else {"text": msg})})


async def _to_agent(receive: Receive, upstream: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            message: dict[str, Any] = await receive()
            if message["type"] != "websocket.receive":
                return
            await upstream.send(message["bytes"] if message.get("bytes") is not None else message["text"])
