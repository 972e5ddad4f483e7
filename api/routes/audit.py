"""``GET /1.0/audit`` (extension ``exec_audit``): the exec audit records of every member, oldest first;
``?limit=`` (default 1000, at most 10000) and ``?project=`` (default: every project the caller may see)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from api.request import identity, project_of
from broker.frontend import Frontend
from core.errors import BadRequest

DEFAULT_LIMIT = 1000


def register(app: FastAPI, backend: Frontend) -> None:
    @app.get("/1.0/audit")
    async def audit(request: Request) -> Response:
        who = identity(request)
        project = project_of(request, backend) if "project" in request.query_params else None
        raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
        if not raw.isdigit() or not 0 < int(raw) <= 10_000:
            raise BadRequest("limit must be a number from 1 to 10000")
        return envelope.sync(await backend.audit_records(int(raw), project, who))
