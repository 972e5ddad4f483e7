"""Instance files (``GET/HEAD/POST/DELETE /1.0/instances/{name}/files?path=``): served by the member that
owns the instance; any other member relays the request to it as is, bodies streamed both ways."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse
from starlette.types import Scope

from api import envelope
from api.request import identity, project
from broker.frontend import Frontend
from core.filespec import content_disposition, instance_path, parse_push

ROUTE = "/1.0/instances/{name}/files"
PUSH_PATH = re.compile(r"/1\.0/instances/[^/]+/files")
RELAYED_HEADERS = ("content-type", "content-length")  # of a push; and every x-lxd-* / x-incus-* header


def is_push(scope: Scope) -> bool:
    """A file push, whose body is streamed to disk and bounded by the disk, not by the JSON body limit."""
    return scope.get("method") == "POST" and PUSH_PATH.fullmatch(scope.get("path", "")) is not None


def _relayed(request: Request, with_body: bool) -> dict[str, str]:
    return {k: v for k, v in request.headers.items()
            if (with_body and k in RELAYED_HEADERS) or k.startswith(("x-lxd-", "x-incus-"))}


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def register(app: FastAPI, backend: Frontend) -> None:
    @app.api_route(ROUTE, methods=["GET", "HEAD", "POST", "DELETE"])
    async def files(name: str, request: Request) -> Response:
        proj, who = project(request, backend), identity(request)
        path = instance_path(request.query_params.get("path"))
        peer = getattr(request.state, "peer", None)
        member, address = await backend.file_owner(proj, name, local_only=getattr(peer, "listener", "") == "member")
        if member:
            push = request.method == "POST"
            if push:
                parse_push(request.headers)  # a bad header is refused here, before the body crosses the link
            relayed = await backend.relay(member, address, request.method, request.url.path,
                                          dict(request.query_params), _relayed(request, push),
                                          _body(request) if push else None, who)
            try:
                return StreamingResponse(relayed.body(), status_code=relayed.status, headers=relayed.headers,
                                         background=BackgroundTask(relayed.aclose))
            except BaseException:
                await relayed.aclose()
                raise
        if request.method == "POST":
            spec = parse_push(request.headers)
            await backend.local.file_push(proj, name, path, spec, _body(request), who)
            return envelope.sync()
        if request.method == "DELETE":
            await backend.local.file_delete(proj, name, path, who)
            return envelope.sync()
        head = request.method == "HEAD"
        got = await backend.local.file_get(proj, name, path, who, head)
        try:
            if got.entries is not None or (head and got.info.type == "directory"):
                return envelope.sync(got.entries or [], headers=got.headers)
            headers = {**got.headers, "Content-Length": str(got.size), "Content-Disposition": content_disposition(path)}
            if head:
                return Response(headers=headers, media_type="application/octet-stream")
            return StreamingResponse(got.chunks(), headers=headers, media_type="application/octet-stream",
                                     background=BackgroundTask(got.close))
        except BaseException:
            got.close()  # the response never started: its file is ours to close
            raise
