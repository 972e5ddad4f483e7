"""Server, projects and cluster routes: ``/``, ``/1.0`` (and its config), ``/1.0/projects``,
``/1.0/cluster``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from api.request import identity, json_body, recursion, trusted
from broker.frontend import Frontend
from core.identity import Identity
from node_agent.server_info import render_untrusted


def register(app: FastAPI, backend: Frontend) -> None:
    admin = backend.admin

    @app.get("/")
    async def root() -> Response:
        return envelope.sync(["/1.0"])

    @app.get("/1.0")
    async def server(request: Request) -> Response:
        who = identity(request) if trusted(request) else None
        return envelope.sync(server_document(backend, who, request.query_params.get("project")))

    @app.put("/1.0")
    async def put_server(request: Request) -> Response:
        assert admin is not None
        await admin.update_config(identity(request), await json_body(request), replace=True)
        return envelope.sync()

    @app.patch("/1.0")
    async def patch_server(request: Request) -> Response:
        assert admin is not None
        await admin.update_config(identity(request), await json_body(request), replace=False)
        return envelope.sync()

    # -- projects -----------------------------------------------------------------------------------
    @app.get("/1.0/projects")
    async def projects(request: Request) -> Response:
        assert admin is not None
        return envelope.sync(await admin.list_projects(identity(request), recursion(request)))

    @app.post("/1.0/projects")
    async def create_project(request: Request) -> Response:
        assert admin is not None
        await admin.create_project(identity(request), await json_body(request))
        return envelope.sync()

    @app.get("/1.0/projects/{name}")
    async def get_project(name: str, request: Request) -> Response:
        assert admin is not None
        return envelope.sync(await admin.get_project(identity(request), name))

    @app.put("/1.0/projects/{name}")
    async def put_project(name: str, request: Request) -> Response:
        assert admin is not None
        await admin.update_project(identity(request), name, await json_body(request), replace=True)
        return envelope.sync()

    @app.patch("/1.0/projects/{name}")
    async def patch_project(name: str, request: Request) -> Response:
        assert admin is not None
        await admin.update_project(identity(request), name, await json_body(request), replace=False)
        return envelope.sync()

    @app.post("/1.0/projects/{name}")
    async def rename_project(name: str, request: Request) -> Response:
        assert admin is not None
        await admin.rename_project(identity(request), name, await json_body(request))
        return envelope.sync()

    @app.delete("/1.0/projects/{name}")
    async def delete_project(name: str, request: Request) -> Response:
        assert admin is not None
        await admin.delete_project(identity(request), name)
        return envelope.sync()

    # -- cluster ------------------------------------------------------------------------------------
    @app.get("/1.0/cluster")
    async def cluster(request: Request) -> Response:
        identity(request)
        return envelope.sync(backend.cluster())

    @app.get("/1.0/cluster/members")
    async def members(request: Request) -> Response:
        identity(request)
        return envelope.sync(backend.members(recursion(request)))

    @app.get("/1.0/cluster/members/{name}")
    async def member(name: str, request: Request) -> Response:
        identity(request)
        return envelope.sync(await backend.member(name))


def server_document(backend: Frontend, who: Identity | None, project: str | None) -> dict[str, Any]:
    """``GET /1.0``: what the caller may see of the server (``who`` None: an untrusted TLS client). The
    project is shown, not checked: any client may read /1.0. (Also the fast path's, api/fastpath.py.)"""
    if who is None:
        return render_untrusted()
    details = backend.admin.server_details(who) if backend.admin is not None else {}
    return backend.local.server_info(who, project=project or "default", **details)
