"""What every route reads off a request: the caller's identity, the project, recursion, a JSON body."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request, WebSocket

from broker import relay
from core.errors import BadRequest, NotFound
from core.identity import Identity, from_uid

MAX_BODY = 1 << 20


def identity(conn: Request | WebSocket) -> Identity:
    """The caller: the unix peer's user, or the identity another member forwarded (member listener)."""
    uid = getattr(conn.state, "peer_uid", None)
    if uid is not None:
        return from_uid(uid)
    h = conn.headers
    return Identity(username=h.get(relay.USER_HEADER, "cluster"), protocol=h.get(relay.PROTOCOL_HEADER, "cluster"))


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
