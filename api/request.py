"""What every route reads off a request: the caller's identity (decided by api/auth.py), the project it
names, recursion, a JSON body."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import Request, WebSocket

from core import projects
from core.errors import BadRequest, Forbidden, NotFound
from core.identity import Identity

if TYPE_CHECKING:
    from broker.frontend import Frontend

MAX_BODY = 1 << 20  # a JSON request body (larger ones get a 413 before they are read: api/limits.py)


def identity(conn: Request | WebSocket) -> Identity:
    """The caller; an untrusted TLS client only reaches the routes that allow it (and asks ``trusted``)."""
    who: Identity | None = getattr(conn.state, "identity", None)
    if who is None:
        raise Forbidden("not authorized")
    return who


def trusted(conn: Request | WebSocket) -> bool:
    return getattr(conn.state, "identity", None) is not None


def project_of(conn: Request | WebSocket, backend: Frontend, allow_all: bool = False) -> str | None:
    """The project a request names (``?project=``, default ``default``), checked against the caller;
    None for ``all-projects``, which only unrestricted callers may ask for."""
    q = conn.query_params
    if q.get("all-projects", "").lower() in ("1", "true"):
        if not allow_all:
            raise BadRequest("all-projects is not supported here")
        if q.get("project"):
            raise BadRequest("Cannot specify a project when requesting all projects")
        if identity(conn).restricted:
            raise Forbidden("Certificate is restricted")
        return None
    name = q.get("project") or projects.DEFAULT
    if backend.admin is None:
        if name != projects.DEFAULT:
            raise NotFound("Project not found")
        return name
    return backend.admin.check_project(identity(conn), name)


def project(conn: Request | WebSocket, backend: Frontend) -> str:
    name = project_of(conn, backend)
    assert name is not None
    return name


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
