"""``GET /1.0/metrics``: this member's metrics (or ``?target=`` member's) in OpenMetrics text, for a
trusted client or a certificate of type ``metrics`` (api/auth.py)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from api.request import identity
from broker.frontend import Frontend
from node_agent.metrics import CONTENT_TYPE


def register(app: FastAPI, backend: Frontend) -> None:
    @app.get("/1.0/metrics")
    async def metrics(request: Request) -> Response:
        text = await backend.metrics_text(request.query_params.get("target"), identity(request))
        return Response(text, headers={"Content-Type": CONTENT_TYPE})
