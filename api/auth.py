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

from starlette.types import ASGIApp, Receive, Scope, Send

from api import envelope
from api.connection import Peer
from core.identity import FORWARDED_HEADER, Identity, from_uid
from core.trust import Certificate

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


class Authenticate:
    def __init__(self, app: ASGIApp, trust: Callable[[str], Certificate | None], admin_group: int | None) -> None:
        self.app = app
        self.trust = trust
        self.admin_group = admin_group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        peer: Peer | None = state.get("peer")
        path = scope.get("path", "")
        if peer is None:
            return await _deny(scope, receive, send, 403, "not authorized")
        if peer.listener == "unix":
            if peer.uid != 0 and (self.admin_group is None or self.admin_group not in peer.gids):
                return await _deny(scope, receive, send, 403, f"not authorized: uid {peer.uid} is neither root "
                                   f"nor a member of the {ADMIN_GROUP} group")
            state["identity"] = from_uid(peer.uid or 0)
        elif peer.listener == "https":
            cert = self.trust(peer.fingerprint) if peer.fingerprint else None
            if cert is not None and cert.type == "metrics" and (scope.get("method"), path) == METRICS:
                state["identity"] = Identity(cert.fingerprint, "tls", "", cert.restricted, cert.projects)
            elif cert is None or cert.type != "client":
                if (scope.get("method", "GET"), path) not in UNTRUSTED or scope["type"] != "http":
                    return await _deny(scope, receive, send, 403, "not authorized")
                state["identity"] = None
            else:
                client = scope.get("client")
                state["identity"] = Identity(cert.fingerprint, "tls", f"{client[0]}:{client[1]}" if client else "",
                                             cert.restricted, cert.projects)
        else:  # a member, or this node's own worker process (its private socket: our uid only)
            if peer.listener == "worker" and peer.uid != os.geteuid():
                return await _deny(scope, receive, send, 403, "not authorized")
            raw = dict(scope.get("headers") or []).get(FORWARDED_HEADER.lower().encode())
            try:
                state["identity"] = Identity.from_wire(json.loads(raw)) if raw else Identity("cluster", "cluster")
            except (ValueError, KeyError, TypeError):
                return await _deny(scope, receive, send, 400, "Invalid forwarded identity")
        if path.startswith(INTERNAL) and peer.listener != "member":
            return await _deny(scope, receive, send, 404, "not found")
        await self.app(scope, receive, send)


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    response = envelope.error(status, message)
    if scope["type"] == "websocket":
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await response(scope, receive, send)

