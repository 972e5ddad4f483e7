"""Exec routes: ``POST /1.0/instances/{name}/exec``, the record-output files (spec §3, §6) and the
fan-out ``POST /1.0/exec`` (extension exec_fanout)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from api import envelope
from api.request import MAX_BODY, identity, project
from broker.frontend import Frontend
from core.errors import BadRequest


def register(app: FastAPI, backend: Frontend) -> None:

    @app.post("/1.0/instances/{name:path}/exec")
    async def exec_(name: str, request: Request) -> Response:
        where = project(request, backend)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest("http: request body too large")
        return envelope.async_op(await backend.exec(where, name, raw, identity(request)))

    @app.post("/1.0/exec")
    async def fanout(request: Request) -> Response:  # extension exec_fanout: one command, many instances
        where = project(request, backend)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest("http: request body too large")
        return envelope.async_op(await backend.fanout(where, raw, identity(request)))

    @app.get("/1.0/instances/{name:path}/logs/exec-output")
    async def exec_outputs(name: str, request: Request) -> Response:
        return envelope.sync(await backend.exec_output_list(project(request, backend), name))

    # {filename:path}: an encoded "/" (..%2Fx) reaches the name check (400, as LXD) instead of missing the route
    @app.get("/1.0/instances/{name:path}/logs/exec-output/{filename:path}")
    async def exec_output(name: str, filename: str, request: Request) -> Response:
        fetched = await backend.exec_output_fetch(project(request, backend), name, filename)
        headers = {"Content-Disposition": f"inline;filename={filename}"}
        if isinstance(fetched, bytes):
            return Response(fetched, media_type="application/octet-stream", headers=headers)
        fd = fetched
        size = os.fstat(fd).st_size

        def chunks() -> Iterator[bytes]:
            with os.fdopen(fd, "rb") as f:
                while block := f.read(1 << 20):
                    yield block

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={**headers, "Content-Length": str(size)})

    @app.delete("/1.0/instances/{name:path}/logs/exec-output/{filename:path}")
    async def delete_exec_output(name: str, filename: str, request: Request) -> Response:
        await backend.exec_output_delete(project(request, backend), name, filename)
        return envelope.sync()

