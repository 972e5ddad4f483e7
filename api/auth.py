"""Who is calling, decided once per request and per websocket before any route runs (checked again on
every request of a kept-alive connection, so a revocation takes effect at once):

* unix socket: root and members of the admin group (``execbroker``, as ``incus-admin``) have full
  access; any other uid gets a 403 saying so;
* HTTPS: a trusted client certificate is its identity (a restricted one sees only its projects); a
  certificate of type ``metrics`` may read ``GET /1.0/metrics`` and nothing more; an unknown certificate
  may read ``GET /1.0`` (``auth: untrusted``) and present a trust token, and gets a 403 for everything else;
* member listener: the TLS layer already proved the peer holds the cluster certificate; a forwarded
  request carries the identity it is made for;
* worker socket (the agent's, for its own worker processes' proxied requests): a peer of our own uid,
  on a socket only that uid may open; the request carries the identity the worker authenticated.

``scope["state"]["identity"]`` is the caller (None only for an untrusted TLS client on the routes open to
it); routes under ``/internal/`` exist only on the member listener.
"""

from __future__ import annotations

import grp
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from api import envelope
from core.identity import FORWARDED_HEADER, Identity, from_uid
from core.trust import Certificate

if TYPE_CHECKING:
    from api.connection import Peer

ADMIN_GROUP = "execbroker"
INTERNAL = "/internal/"
# What a client whose certificate is not trusted may do (as Incus): read the server, present a token.
METRICS = ("GET", "/1.0/metrics")  # all a certificate of type "metrics" may do, beside UNTRUSTED
UNTRUSTED = {("GET", "/"), ("GET", "/1.0"), ("GET", "/1.0/"), ("POST", "/1.0/certificates")}


def admin_gid(group: str = ADMIN_GROUP) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


class Denied(Exception):
    """A request refused before any route: ``status`` and the envelope's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Identify:
    """Who a request is from, given its listener's peer (api/connection.py), method, path and headers.
    Used by ``Authenticate`` (every FastAPI route) and by the exec fast path (api/fastpath.py)."""

    def __init__(self, trust: Callable[[str], Certificate | None], admin_group: int | None) -> None:
        self.trust = trust
        self.admin_group = admin_group

    def __call__(self, peer: Peer | None, method: str, path: str, websocket: bool,
                 headers: Callable[[bytes], bytes | None], client: Any = None) -> Identity | None:
        """The caller (None only for an untrusted TLS client on the routes open to it); raises Denied."""
        if peer is None:
            raise Denied(403, "not authorized")
        who: Identity | None
        if peer.listener == "unix":
            if peer.uid != 0 and (self.admin_group is None or self.admin_group not in peer.gids):
                raise Denied(403, f"not authorized: uid {peer.uid} is neither root "
                             f"nor a member of the {ADMIN_GROUP} group")
            who = from_uid(peer.uid or 0)
        elif peer.listener == "https":
            cert = self.trust(peer.fingerprint) if peer.fingerprint else None
            if cert is not None and cert.type == "metrics" and not websocket and (method, path) == METRICS:
                who = Identity(cert.fingerprint, "tls", "", cert.restricted, cert.projects)
            elif cert is None or cert.type != "client":
                if (method, path) not in UNTRUSTED or websocket:
                    raise Denied(403, "not authorized")
                who = None
            else:
                who = Identity(cert.fingerprint, "tls", f"{client[0]}:{client[1]}" if client else "",
                               cert.restricted, cert.projects)
        else:  # a member, or this node's own worker process (its private socket: our uid only)
            if peer.listener == "worker" and peer.uid != os.geteuid():
                raise Denied(403, "not authorized")
            raw = headers(FORWARDED_HEADER.lower().encode())
            try:
                who = Identity.from_wire(json.loads(raw)) if raw else Identity("cluster", "cluster")
            except (ValueError, KeyError, TypeError):
                raise Denied(400, "Invalid forwarded identity") from None
        if path.startswith(INTERNAL) and peer.listener != "member":
            raise Denied(404, "not found")
        return who


class Authenticate:
    def __init__(self, app: ASGIApp, trust: Callable[[str], Certificate | None], admin_group: int | None) -> None:
        self.app = app
        self.identify = Identify(trust, admin_group)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        headers = scope.get("headers") or []
        try:
            state["identity"] = self.identify(
                state.get("peer"), scope.get("method", "GET"), scope.get("path", ""), scope["type"] == "websocket",
                lambda name: dict(headers).get(name), scope.get("client"))
        except Denied as exc:
            return await _deny(scope, receive, send, exc.status, exc.message)
        await self.app(scope, receive, send)


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    response = envelope.error(status, message)
    if scope["type"] == "websocket":
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await response(scope, receive, send)

