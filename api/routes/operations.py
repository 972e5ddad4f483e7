"""Operation routes: list, get, cancel, wait, and the exec websockets (spec §4), relayed when another
member runs the operation."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from starlette.responses import Response, StreamingResponse

from api import envelope
from api.request import identity, project_of, recursion
from api.wschannel import WebSocketChannel
from broker import relay
from broker.frontend import Frontend
from core.errors import ApiError, BadRequest

_GO_INT = re.compile(r"[+-]?[0-9]+")


def register(app: FastAPI, backend: Frontend) -> None:
    @app.get("/1.0/operations")
    async def operations(request: Request) -> Response:
        where = project_of(request, backend, allow_all=True)
        return envelope.sync(await backend.list_operations(where, recursion(request), identity(request)))

    @app.get("/1.0/operations/{op_id}")
    async def operation(op_id: str, request: Request) -> Response:
        return envelope.sync(await backend.get_operation(op_id, identity(request)))

    @app.delete("/1.0/operations/{op_id}")
    async def cancel_operation(op_id: str, request: Request) -> Response:
        await backend.cancel_operation(op_id, identity(request))
        return envelope.sync()

    @app.get("/1.0/operations/{op_id}/wait")
    async def wait_operation(op_id: str, request: Request) -> Response:
        timeout = float(_atoi(request.query_params.get("timeout", "-1")))
        who = identity(request)
        await backend.get_operation(op_id, who)  # 404 before the 200 headers go out

        async def body() -> Any:
            op = await backend.wait_operation(op_id, None if timeout < 0 else timeout, who)
            yield envelope.sync(op).body

        return StreamingResponse(body(), media_type="application/json",
                                 headers={"Connection": "keep-alive"})

    @app.websocket("/1.0/operations/{op_id}/websocket")
    async def operation_websocket(ws: WebSocket, op_id: str) -> None:
        secret = ws.query_params.get("secret", "")
        who = identity(ws)
        dialing: asyncio.Future[Any] | None = None
        try:
            offset = _offset(ws.query_params.get("offset"))
            owner = await backend.websocket_owner(op_id)
            if owner:  # another member runs it
                if not secret:
                    raise BadRequest("Missing websocket secret")
                if backend.precheck_relay(op_id, secret, who):  # we forwarded it: dial while upgrading
                    dialing = asyncio.ensure_future(backend.dial_owner(owner, op_id, secret, who, offset))
                else:  # dial first, so the owner's refusal is our refusal
                    dialing = asyncio.get_running_loop().create_future()
                    dialing.set_result(await backend.dial_owner(owner, op_id, secret, who, offset))
            else:
                session, fd = backend.claim_websocket(op_id, secret, who, offset)
        except ApiError as exc:
            await ws.send_denial_response(envelope.from_exception(exc))
            return
        if dialing is not None:
            if await _relay_when_dialled(ws, dialing):
                await backend.check_owner(op_id, who)
            return
        try:
            await ws.accept()
        except BaseException:
            session.release(fd)
            raise
        await session.attach(fd, WebSocketChannel(ws))



def _atoi(raw: str) -> int:
    """``?timeout=`` as Incus parses it, with Go's ``strconv.Atoi``: an optional sign and ASCII digits, in
    int64; anything else is the 500 Incus answers (spec §4.3). Python's int() would take "1_0", " 1" or
    Arabic digits, and 400 digits would overflow the float the wait takes."""
    if not _GO_INT.fullmatch(raw):
        raise ApiError(f'strconv.Atoi: parsing "{raw}": invalid syntax', 500)
    if len(raw.lstrip("+-").lstrip("0")) > 19 or not -(2**63) <= int(raw) < 2**63:
        raise ApiError(f'strconv.Atoi: parsing "{raw}": value out of range', 500)
    return int(raw)


def _offset(raw: str | None) -> int | None:
    """``?offset=N`` of a reattach to a detachable exec (extension exec_detach)."""
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 20:
        raise BadRequest(f"Invalid offset {raw[:40]!r}")
    return int(raw)


async def _relay_when_dialled(ws: WebSocket, dialing: asyncio.Future[Any]) -> bool:
    """Upgrade the client, then relay once the owner's socket is open (or close with 1011 if it is not).
    True when the owner went away mid-stream."""
    try:
        await ws.accept()
    except BaseException:
        dialing.cancel()
        with contextlib.suppress(BaseException):
            await (await dialing).close()
        raise
    try:
        upstream = await dialing
    except ApiError:
        with contextlib.suppress(Exception):
            await ws.close(1011)
        return False
    return await relay.relay(WebSocketChannel(ws), upstream)
