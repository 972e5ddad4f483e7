"""The Incus-compatible /1.0 HTTP and websocket API, as a FastAPI app over a backend.

Routes only translate HTTP to backend calls; errors are domain exceptions mapped to the Incus error
envelope here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api import envelope, relay
from api.wschannel import WebSocketChannel
from broker.errors import ApiError, BadRequest, NotFound
from broker.identity import Identity, from_uid
from node_agent.frontend import Frontend

MAX_BODY = 1 << 20


def identity(conn: Request | WebSocket) -> Identity:
    """The caller: the unix peer's user, or the identity another member forwarded (member listener)."""
    uid = getattr(conn.state, "peer_uid", None)
    if uid is not None:
        return from_uid(uid)
    h = conn.headers
    return Identity(username=h.get(relay.USER_HEADER, "cluster"), protocol=h.get(relay.PROTOCOL_HEADER, "cluster"))


class MemberAuth:
    """Requests that did not come over the unix socket (the member-to-member listener) must carry the
    cluster token; anything else is refused before it reaches a route."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = (token or "").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("state", {}).get("peer_uid") is None:
            given = dict(scope.get("headers") or []).get(relay.TOKEN_HEADER.lower().encode(), b"")
            if not self.token or not hmac.compare_digest(given, self.token):
                body = envelope.error(403, "not authorized")
                if scope["type"] == "websocket":
                    await send({"type": "websocket.http.response.start", "status": 403,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "websocket.http.response.body", "body": body.body})
                else:
                    await body(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_project(conn: Request | WebSocket, allow_all: bool = False) -> str | None:
    """The project of a request: only ``default`` exists; ``None`` means all projects."""
    q = conn.query_params
    all_projects = q.get("all-projects", "").lower() in ("1", "true")
    if all_projects:
        if not allow_all:
            raise BadRequest("all-projects is not supported here")
        if q.get("project"):
            raise BadRequest("Cannot specify a project when requesting all projects")
        return None
    project = q.get("project") or "default"
    if project != "default":
        raise NotFound("Project not found")
    return project


def recursion(request: Request) -> int:
    try:
        return int(request.query_params.get("recursion", "0"))
    except ValueError:
        raise BadRequest("Invalid recursion value") from None


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest("http: request body too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


def create_app(backend: Frontend, cluster_token: str | None = None) -> FastAPI:
    app = FastAPI(title="execbroker", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.add_middleware(MemberAuth, token=cluster_token)

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> Response:
        return envelope.from_exception(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            return envelope.error(501, "not implemented")
        if exc.status_code == 404:
            return envelope.error(404, "not found")
        return envelope.error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> Response:
        return envelope.error(400, str(exc.errors()[0].get("msg", "invalid request")))

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> Response:
        return envelope.error(500, str(exc) or type(exc).__name__)

    # -- server -------------------------------------------------------------------------------------
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

    # -- instances ----------------------------------------------------------------------------------
    @app.get("/1.0/instances")
    async def instances(request: Request) -> Response:
        check_project(request, allow_all=True)
        return envelope.sync(await backend.list_instances(recursion(request)))

    @app.post("/1.0/instances")
    async def create_instance(request: Request) -> Response:
        check_project(request)
        return envelope.async_op(await backend.create_instance(await json_body(request), identity(request),
                                                               request.query_params.get("target")))

    @app.get("/1.0/instances/{name}")
    async def get_instance(name: str, request: Request) -> Response:
        check_project(request)
        # recursion=1 on one instance is the full form (state, snapshots), as with instance_get_full
        return envelope.sync(await backend.get_instance(name, 2 if recursion(request) else 1))

    @app.patch("/1.0/instances/{name}")
    async def patch_instance(name: str, request: Request) -> Response:
        check_project(request)
        await backend.update_instance(name, await json_body(request), identity(request))
        return envelope.sync()

    @app.delete("/1.0/instances/{name}")
    async def delete_instance(name: str, request: Request) -> Response:
        check_project(request)
        return envelope.async_op(await backend.delete_instance(name, identity(request)))

    @app.get("/1.0/instances/{name}/snapshots")
    async def snapshots(name: str, request: Request) -> Response:
        check_project(request)
        await backend.get_instance(name)  # 404 for an unknown instance; execbroker keeps no snapshots
        return envelope.sync([])

    @app.get("/1.0/instances/{name}/state")
    async def get_state(name: str, request: Request) -> Response:
        check_project(request)
        return envelope.sync(await backend.get_instance_state(name))

    @app.put("/1.0/instances/{name}/state")
    async def put_state(name: str, request: Request) -> Response:
        check_project(request)
        return envelope.async_op(await backend.change_state(name, await json_body(request), identity(request)))

    @app.post("/1.0/instances/{name:path}/exec")
    async def exec_(name: str, request: Request) -> Response:
        check_project(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest("http: request body too large")
        return envelope.async_op(await backend.exec(name, raw, identity(request)))

    @app.get("/1.0/instances/{name:path}/logs/exec-output")
    async def exec_outputs(name: str, request: Request) -> Response:
        check_project(request)
        return envelope.sync(await backend.exec_output_list(name))

    @app.get("/1.0/instances/{name:path}/logs/exec-output/{filename}")
    async def exec_output(name: str, filename: str, request: Request) -> Response:
        check_project(request)
        fetched = await backend.exec_output_fetch(name, filename)
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

    @app.delete("/1.0/instances/{name:path}/logs/exec-output/{filename}")
    async def delete_exec_output(name: str, filename: str, request: Request) -> Response:
        check_project(request)
        await backend.exec_output_delete(name, filename)
        return envelope.sync()

    # -- operations ---------------------------------------------------------------------------------
    @app.get("/1.0/operations")
    async def operations(request: Request) -> Response:
        project_name = check_project(request, allow_all=True)
        return envelope.sync(await backend.list_operations(recursion(request), project_name))

    @app.get("/1.0/operations/{op_id}")
    async def operation(op_id: str) -> Response:
        return envelope.sync(await backend.get_operation(op_id))

    @app.delete("/1.0/operations/{op_id}")
    async def cancel_operation(op_id: str) -> Response:
        await backend.cancel_operation(op_id)
        return envelope.sync()

    @app.get("/1.0/operations/{op_id}/wait")
    async def wait_operation(op_id: str, request: Request) -> Response:
        raw = request.query_params.get("timeout", "-1")
        try:
            timeout = float(int(raw))
        except ValueError:
            raise ApiError(f'strconv.Atoi: parsing "{raw}": invalid syntax', 500) from None
        await backend.get_operation(op_id)  # 404 before the 200 headers go out

        async def body() -> Any:
            op = await backend.wait_operation(op_id, None if timeout < 0 else timeout)
            yield envelope.sync(op).body

        return StreamingResponse(body(), media_type="application/json",
                                 headers={"Connection": "keep-alive"})

    @app.websocket("/1.0/operations/{op_id}/websocket")
    async def operation_websocket(ws: WebSocket, op_id: str) -> None:
        secret = ws.query_params.get("secret", "")
        who = identity(ws)
        dialing: asyncio.Future[Any] | None = None
        try:
            owner = await backend.websocket_owner(op_id)
            if owner:  # another member runs it
                if not secret:
                    raise BadRequest("Missing websocket secret")
                if backend.precheck_relay(op_id, secret, who):  # we forwarded it: dial while upgrading
                    dialing = asyncio.ensure_future(relay.dial(owner, op_id, secret, who, cluster_token or ""))
                else:  # dial first, so the owner's refusal is our refusal
                    dialing = asyncio.get_running_loop().create_future()
                    dialing.set_result(await relay.dial(owner, op_id, secret, who, cluster_token or ""))
            else:
                session, fd = backend.claim_websocket(op_id, secret, who)
        except ApiError as exc:
            await ws.send_denial_response(envelope.from_exception(exc))
            return
        if dialing is not None:
            await _relay_when_dialled(ws, dialing)
            return
        try:
            await ws.accept()
        except BaseException:
            session.release(fd)
            raise
        await session.attach(fd, WebSocketChannel(ws))

    # -- events -------------------------------------------------------------------------------------
    @app.websocket("/1.0/events")
    async def events(ws: WebSocket) -> None:
        try:
            project_name = check_project(ws, allow_all=True)
            listener = backend.subscribe(ws.query_params.get("type"), project_name)
        except ApiError as exc:
            await ws.send_denial_response(envelope.from_exception(exc))
            return
        reader: asyncio.Future[None] | None = None
        try:  # the listener exists before the 101 goes out: no event after it is missed
            await ws.accept()
            reader = asyncio.ensure_future(_until_disconnect(ws))
            while True:
                nxt = asyncio.ensure_future(listener.next())
                await asyncio.wait({nxt, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    break
                frame = nxt.result()
                if frame is None:
                    break
                await ws.send_text(frame)
        except Exception:  # noqa: BLE001 - a broken events socket just ends the listener
            pass
        finally:
            backend.unsubscribe(listener)
            if reader is not None:
                reader.cancel()
            with contextlib.suppress(Exception):
                await ws.close()

    return app


async def _relay_when_dialled(ws: WebSocket, dialing: asyncio.Future[Any]) -> None:
    """Upgrade the client, then relay once the owner's socket is open (or close with 1011 if it is not)."""
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
        return
    await relay.relay(ws, upstream)


async def _until_disconnect(ws: WebSocket) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


def _project() -> dict[str, Any]:
    return {"name": "default", "description": "Default project", "config": {}, "used_by": []}
