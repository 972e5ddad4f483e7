"""Calls from one member's front end to another member's NodeService, as JSON over the member link:
which methods may be called (nothing but the NodeService surface), and how their arguments and results
travel (plain JSON, plus tagged forms for an Identity, an exec request and bytes)."""

from __future__ import annotations

import base64
import inspect
from typing import Any

from core import errors
from core.errors import ApiError, BadRequest
from core.execspec import ExecPost
from core.identity import Identity

# What other members may call: the NodeService surface, nothing else.
REMOTE_METHODS = frozenset({
    "list_instances", "get_instance", "get_instance_state", "create_instance", "update_instance", "replace_instance",
    "delete_instance", "change_state", "exec", "exec_output_list", "exec_output_read", "exec_output_delete",
    "list_operations", "get_operation", "wait_operation", "cancel_operation", "projects_in_use", "metrics_text",
    "audit_records", "exec_capture", "has_operation", "metrics_samples",
})
MAX_CALL = 4 << 20  # bytes of one call's JSON (an exec request is at most 1 MiB)


def encode(value: Any) -> Any:
    if isinstance(value, Identity):
        return {"$identity": value.to_wire()}
    if isinstance(value, ExecPost):
        return {"$exec": value.model_dump(by_alias=True)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == "$identity":
                return Identity.from_wire(inner)
            if tag == "$exec":
                return ExecPost.model_validate(inner)
            if tag == "$bytes":
                return base64.b64decode(inner)
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


async def serve(service: Any, method: str, args: list[Any]) -> dict[str, Any]:
    """Run a call another member made; the reply is ``{"ok": value}`` or ``{"error": [status, text]}``."""
    if method not in REMOTE_METHODS or not isinstance(args, list):
        return {"error": [400, f"unknown method {method}"]}
    try:
        value = getattr(service, method)(*decode(args))
        if inspect.isawaitable(value):
            value = await value
    except ApiError as exc:
        return {"error": [exc.status, exc.message]}
    except (TypeError, ValueError) as exc:  # arguments that do not fit the method
        return {"error": [400, f"bad arguments for {method}: {exc}"]}
    return {"ok": encode(value)}


def result(reply: Any) -> Any:
    """The value of a reply, or its error raised as the same ApiError."""
    if not isinstance(reply, dict):
        raise BadRequest("malformed reply from a cluster member")
    if "error" in reply:
        status, message = reply["error"]
        raise errors.from_status(str(message), int(status))
    return decode(reply.get("ok"))


def socket_request(op_id: str, secret: str, who: Identity, offset: int | None) -> dict[str, Any]:
    """What opens an exec websocket of another process's (a member's, a worker's) as a link stream."""
    return {"op": op_id, "secret": secret, "identity": who.to_wire(), "offset": offset}


def read_socket_request(request: dict[str, Any], peer: str) -> tuple[str, str, Identity, int | None]:
    """``socket_request``'s fields, checked (a malformed one is a BadRequest naming ``peer``)."""
    op_id, secret, offset = request.get("op"), request.get("secret"), request.get("offset")
    if not isinstance(op_id, str) or not isinstance(secret, str) or not (
            offset is None or (isinstance(offset, int) and offset >= 0)):
        raise BadRequest(f"malformed socket request from {peer}")
    return op_id, secret, Identity.from_wire(request.get("identity") or {}), offset
