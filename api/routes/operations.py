"""Operation routes: list, get, cancel, wait (spec §4). The exec websockets, and the usual get and wait,
are served by the fast path (api/fastpath.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from api import envelope
from api.request import atoi, identity, project_of, recursion
from broker.frontend import Frontend


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
        timeout = float(atoi(request.query_params.get("timeout", "-1")))
        who = identity(request)
        await backend.get_operation(op_id, who)  # 404 before the 200 headers go out

        async def body() -> Any:
            op = await backend.wait_operation(op_id, None if timeout < 0 else timeout, who)
            yield envelope.sync(op).body

        return StreamingResponse(body(), media_type="application/json",
                                 headers={"Connection": "keep-alive"})
