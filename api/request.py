"""What every route reads off a request: the caller's identity (decided by api/auth.py), the project it
names, recursion, a JSON body."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Request, WebSocket

from core import projects
from core.errors import ApiError, BadRequest, Forbidden, NotFound
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
    return project_in(conn.query_params, lambda: identity(conn), backend, allow_all)


def project_in(query: Mapping[str, str], who: Callable[[], Identity], backend: Frontend,
               allow_all: bool = False) -> str | None:
    """``project_of`` for a request's query parameters and its caller (asked only when it matters)."""
    if query.get("all-projects", "").lower() in ("1", "true"):
        if not allow_all:
            raise BadRequest("all-projects is not supported here")
        if query.get("project"):
            raise BadRequest("Cannot specify a project when requesting all projects")
        if who().restricted:
            raise Forbidden("Certificate is restricted")
        return None
    name = query.get("project") or projects.DEFAULT
    if backend.admin is None:
        if name != projects.DEFAULT:
            raise NotFound("Project not found")
        return name
    return backend.admin.check_project(who(), name)


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


_GO_INT = re.compile(r"[+-]?[0-9]+")


def atoi(raw: str) -> int:
    """``?timeout=`` of ``/wait`` as Incus parses it, with Go's ``strconv.Atoi``: an optional sign and ASCII
    digits, in int64; anything else is the 500 Incus answers (spec §4.3). Python's int() would take "1_0",
    " 1" or Arabic digits, and 400 digits would overflow the float the wait takes."""
    if not _GO_INT.fullmatch(raw):
        raise ApiError(f'strconv.Atoi: parsing "{raw}": invalid syntax', 500)
    if len(raw.lstrip("+-").lstrip("0")) > 19 or not -(2**63) <= int(raw) < 2**63:
        raise ApiError(f'strconv.Atoi: parsing "{raw}": value out of range', 500)
    return int(raw)


def offset(raw: str | None) -> int | None:
    """``?offset=N`` of a reattach to a detachable exec's websocket (extension exec_detach)."""
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 20:
        raise BadRequest(f"Invalid offset {raw[:40]!r}")
    return int(raw)
