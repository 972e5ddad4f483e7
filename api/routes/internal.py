"""What members call on each other (member listener only, api/auth.py): NodeService calls forwarded by
another member's front end, and event batches of another member's origin."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Scope

from api import envelope
from api.limits import PayloadTooLarge, too_large
from broker import rpc
from broker.frontend import Frontend
from core.errors import BadRequest

EVENTS_BODY = 64 << 20  # one batch of events between members (fan-out results alone can be several MiB)


def is_member_request(scope: Scope) -> bool:
    """A member's call or event batch: bounded here, by what it is, not by the clients' JSON body limit
    (the member listener alone serves these: api/auth.py)."""
    return str(scope.get("path", "")).startswith("/internal/v1/")


async def _json(request: Request, limit: int) -> dict:  # type: ignore[type-arg]
    raw = bytearray()
    async for chunk in request.stream():  # read no further than the bound
        raw += chunk
        if len(raw) > limit:
            raise PayloadTooLarge(too_large(limit))
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


def register(app: FastAPI, backend: Frontend) -> None:
    @app.post("/internal/v1/call")
    async def call(request: Request) -> Response:
        body = await _json(request, rpc.MAX_CALL)
        if backend.link is not None:
            await backend.link.note_peer(str(body.get("caller", "")))
        reply = await rpc.serve(backend.local, str(body.get("method", "")), body.get("args"))
        return envelope.JSONBody(reply)

    @app.post("/internal/v1/events")
    async def events(request: Request) -> Response:
        body = await _json(request, EVENTS_BODY)
        batch = body.get("batch")
        if not isinstance(batch, list):
            raise BadRequest("events: a batch is required")
        backend.receive_events(str(body.get("member", "")), [tuple(e) for e in batch])  # type: ignore[misc]
        return envelope.sync()
