"""Member-listener authentication: requests that did not come over the unix socket must carry the
cluster token, checked before any route runs."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from api import envelope
from broker import relay


class MemberAuth:
    """Requests that did not come over the unix socket (the member-to-member listener) must carry the
    cluster token; anything else is refused before it reaches a route."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = (token or "").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("state", {}).get("peer_uid") is None:
            given = dict(scope.get("headers") or []).get(relay.TOKEN_HEADER.lower().encode(), b"")
            if not self.token or not hmac.compare_digest(given, self.token):
                body = envelope.error(403, "not authorized")
                if scope["type"] == "websocket":
                    await send({"type": "websocket.http.response.start", "status": 403,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "websocket.http.response.body", "body": body.body})
                else:
                    await body(scope, receive, send)
                return
        await self.app(scope, receive, send)
