"""Server, projects and cluster routes: ``/``, ``/1.0``, ``/1.0/projects``, ``/1.0/cluster``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from api.request import check_project, identity, recursion
from broker.frontend import Frontend
from core.errors import NotFound


def register(app: FastAPI, backend: Frontend) -> None:
    @app.get("/")
    async def root() -> Response:
        return envelope.sync(["/1.0"])

    @app.get("/1.0")
    async def server(request: Request) -> Response:
        check_project(request)
        return envelope.sync(backend.server_info(identity(request)))

    @app.get("/1.0/projects")
    async def projects(request: Request) -> Response:
        if recursion(request):
            return envelope.sync([_project()])
        return envelope.sync(["/1.0/projects/default"])

    @app.get("/1.0/projects/{name}")
    async def project(name: str) -> Response:
        if name != "default":
            raise NotFound("Project not found")
        return envelope.sync(_project())

    # -- cluster ------------------------------------------------------------------------------------
    @app.get("/1.0/cluster")
    async def cluster() -> Response:
        return envelope.sync(backend.cluster())

    @app.get("/1.0/cluster/members")
    async def members(request: Request) -> Response:
        return envelope.sync(backend.members(recursion(request)))

    @app.get("/1.0/cluster/members/{name}")
    async def member(name: str) -> Response:
        return envelope.sync(await backend.member(name))



def _project() -> dict[str, Any]:
    return {"name": "default", "description": "Default project", "config": {}, "used_by": []}
