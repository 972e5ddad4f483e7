"""The request-body bound at the edge: a body over the limit gets a 413 in the Incus envelope, on its
Content-Length before a byte of it is read, or as soon as a chunked body passes the limit."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import envelope
from core.errors import ApiError

MAX_BODY = 1 << 20


class PayloadTooLarge(ApiError):
    status = 413


def too_large(limit: int) -> str:
    return f"Request body too large (limit {limit} bytes)"


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = MAX_BODY,
                 unbounded: Callable[[Scope], bool] = lambda _scope: False) -> None:
        self.app = app
        self.limit = limit
        self.unbounded = unbounded  # requests whose body a route streams (file pushes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.unbounded(scope):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await envelope.error(413, too_large(self.limit))(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(too_large(self.limit))
            return message

        await self.app(scope, bounded, send)
