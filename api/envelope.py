"""The three Incus response envelopes (spec §1): their JSON bytes (what the exec fast path writes,
api/fastpath.py) and the same as Starlette responses (every FastAPI route). Every key always present."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from core.errors import ApiError

_encode = json.JSONEncoder(separators=(",", ":")).encode


def dumps(content: Any) -> bytes:
    return _encode(content).encode()


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else dumps(content)


def sync_body(metadata: Any = None) -> bytes:
    return dumps({
        "type": "sync", "status": "Success", "status_code": 200, "operation": "",
        "error_code": 0, "error": "", "metadata": {} if metadata is None else metadata,
    })


def async_body(op: dict[str, Any]) -> tuple[bytes, str]:
    """The 202 envelope of a new operation, and its URL (the response's Location)."""
    url = f"/1.0/operations/{op['id']}"
    return dumps({
        "type": "async", "status": "Operation created", "status_code": 100, "operation": url,
        "error_code": 0, "error": "", "metadata": op,
    }), url


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "status": "", "status_code": 0, "operation": "", "error_code": status,
            "error": message, "metadata": None}


def sync(metadata: Any = None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONBody(sync_body(metadata), status_code=status, headers=headers)


def async_op(op: dict[str, Any]) -> Response:
    body, url = async_body(op)
    return JSONBody(body, status_code=202, headers={"Location": url})


def error(status: int, message: str) -> Response:
    return JSONBody(error_body(status, message), status_code=status,
                    headers={"X-Content-Type-Options": "nosniff"})


def from_exception(exc: ApiError) -> Response:
    return error(exc.status, exc.message)
