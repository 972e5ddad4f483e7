"""Instance routes: list, create, get, update, delete, state, snapshots (``?project=`` on all)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from api.request import identity, json_body, project, project_of, recursion
from broker.frontend import Frontend


def register(app: FastAPI, backend: Frontend) -> None:
    @app.get("/1.0/instances")
    async def instances(request: Request) -> Response:
        name = project_of(request, backend, allow_all=True)
        return envelope.sync(await backend.list_instances(name, recursion(request), identity(request)))

    @app.post("/1.0/instances")
    async def create_instance(request: Request) -> Response:
        return envelope.async_op(await backend.create_instance(
            project(request, backend), await json_body(request), identity(request),
            request.query_params.get("target")))

    @app.get("/1.0/instances/{name}")
    async def get_instance(name: str, request: Request) -> Response:
        # recursion=1 on one instance is the full form (state, snapshots), as with instance_get_full
        return envelope.sync(await backend.get_instance(project(request, backend), name,
                                                        2 if recursion(request) else 1))

    @app.patch("/1.0/instances/{name}")
    async def patch_instance(name: str, request: Request) -> Response:
        await backend.update_instance(project(request, backend), name, await json_body(request), identity(request))
        return envelope.sync()

    @app.put("/1.0/instances/{name}")
    async def put_instance(name: str, request: Request) -> Response:  # what `lxc config set` sends
        return envelope.async_op(await backend.replace_instance(project(request, backend), name,
                                                                await json_body(request), identity(request)))

    @app.delete("/1.0/instances/{name}")
    async def delete_instance(name: str, request: Request) -> Response:
        return envelope.async_op(await backend.delete_instance(project(request, backend), name, identity(request)))

    @app.get("/1.0/instances/{name}/snapshots")
    async def snapshots(name: str, request: Request) -> Response:
        # 404 for an unknown instance; execbroker keeps no snapshots
        await backend.get_instance(project(request, backend), name)
        return envelope.sync([])

    @app.get("/1.0/instances/{name}/state")
    async def get_state(name: str, request: Request) -> Response:
        return envelope.sync(await backend.get_instance_state(project(request, backend), name))

    @app.put("/1.0/instances/{name}/state")
    async def put_state(name: str, request: Request) -> Response:
        return envelope.async_op(await backend.change_state(project(request, backend), name,
                                                            await json_body(request), identity(request)))
