"""The Incus-compatible /1.0 HTTP and websocket API, as a FastAPI app over the front end.

Before any route: who is calling (api/auth.py) and how large a body may be (api/limits.py). Routes
(api/routes/) only translate HTTP to front-end calls; errors are domain exceptions mapped to the Incus
error envelope here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api import envelope
from api.auth import Authenticate, Identify
from api.fastpath import FastPath, ServesHere
from api.limits import MAX_BODY, BodyLimit
from api.proxy import ToAgent
from api.routes import (
    audit,
    certificates,
    exec,
    files,
    images,
    instances,
    metrics,
    operations,
    server,
)
from broker.frontend import Frontend
from core.errors import ApiError
from core.trust import Certificate


def create_app(backend: Frontend, trust: Callable[[str], Certificate | None] = lambda _fp: None,
               admin_group: int | None = None, max_body: int = MAX_BODY,
               to_agent: tuple[Path, Callable[[Scope], bool]] | None = None) -> FastAPI:
    """``to_agent`` (a worker process): the agent's worker socket, and which requests this process
    serves itself; the others go there (api/proxy.py), after the caller was identified here."""
    app = FastAPI(title="execbroker", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    if to_agent is not None:
        app.add_middleware(ToAgent, socket_path=to_agent[0], serves_here=to_agent[1])  # innermost
    app.add_middleware(BodyLimit, limit=max_body, unbounded=files.is_push)  # a file's size is the disk's
    app.add_middleware(Authenticate, trust=trust, admin_group=admin_group)  # outermost: runs first

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

    not_found = app.router.not_found

    async def _no_route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # an upgrade to no route: 404 in the envelope (Starlette: a bare 403)
            await WebSocket(scope, receive, send).send_denial_response(envelope.error(404, "not found"))
            return
        await not_found(scope, receive, send)

    app.router.default = _no_route

    server.register(app, backend)
    if backend.admin is not None:
        certificates.register(app, backend)
    instances.register(app, backend)
    images.register(app, backend)
    exec.register(app, backend)
    files.register(app, backend)
    metrics.register(app, backend)
    audit.register(app, backend)
    operations.register(app, backend)
    return app


def create_fast_path(backend: Frontend, trust: Callable[[str], Certificate | None] = lambda _fp: None,
                     admin_group: int | None = None, max_body: int = MAX_BODY,
                     serves_here: ServesHere | None = None) -> FastPath:
    """The exec hot path beside ``create_app``'s app (the same caller rules, body bound and, in a
    worker process, the same choice of what it serves itself)."""
    return FastPath(backend, Identify(trust, admin_group), max_body, serves_here=serves_here)
