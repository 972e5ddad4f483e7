"""The three Incus response envelopes (spec §1), as Starlette responses. Every key always present."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from core.errors import ApiError


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def sync(metadata: Any = None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONBody({
        "type": "sync", "status": "Success", "status_code": 200, "operation": "",
        "error_code": 0, "error": "", "metadata": {} if metadata is None else metadata,
    }, status_code=status, headers=headers)


def async_op(op: dict[str, Any]) -> Response:
    url = f"/1.0/operations/{op['id']}"
    return JSONBody({
        "type": "async", "status": "Operation created", "status_code": 100, "operation": url,
        "error_code": 0, "error": "", "metadata": op,
    }, status_code=202, headers={"Location": url})


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "status": "", "status_code": 0, "operation": "", "error_code": status,
            "error": message, "metadata": None}


def error(status: int, message: str) -> Response:
    return JSONBody(error_body(status, message), status_code=status,
                    headers={"X-Content-Type-Options": "nosniff"})


def from_exception(exc: ApiError) -> Response:
    return error(exc.status, exc.message)
