"""What members call on each other (member listener only, api/auth.py): NodeService calls forwarded by
another member's front end, and event batches of another member's origin."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from broker import rpc
from broker.frontend import Frontend
from core.errors import BadRequest


async def _json(request: Request) -> dict:  # type: ignore[type-arg]
    raw = await request.body()
    if len(raw) > rpc.MAX_CALL:
        raise BadRequest("call too large")
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
        body = await _json(request)
        if backend.link is not None:
            await backend.link.note_peer(str(body.get("caller", "")))
        reply = await rpc.serve(backend.local, str(body.get("method", "")), body.get("args"))
        return envelope.JSONBody(reply)

    @app.post("/internal/v1/events")
    async def events(request: Request) -> Response:
        body = await _json(request)
        batch = body.get("batch")
        if not isinstance(batch, list):
            raise BadRequest("events: a batch is required")
        backend.receive_events(str(body.get("member", "")), [tuple(e) for e in batch])  # type: ignore[misc]
        return envelope.sync()
