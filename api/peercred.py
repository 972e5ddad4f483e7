"""Caller identity from the unix socket's peer credentials (SO_PEERCRED).

uvicorn does not put the peer's credentials into the ASGI scope, but it copies the per-connection
``app_state`` into ``scope["state"]`` for every request and websocket. These protocol subclasses give
each connection its own ``app_state`` holding the peer uid, so routes read ``request.state.peer_uid``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

_UCRED = struct.Struct("3i")


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


SEND_BUFFER = 4 << 20  # a 1 MiB output frame leaves in one send(): no partial writes, copies, wake-ups


def _with_peer(app_state: dict[str, Any], transport: asyncio.BaseTransport) -> dict[str, Any]:
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
    return {**app_state, "peer_uid": peer_uid(transport)}


class PeerCredHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.app_state = _with_peer(self.app_state, transport)
        super().connection_made(transport)


class PeerCredWebSocketProtocol(WebSocketsSansIOProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if "peer_uid" not in self.app_state:
            self.app_state = _with_peer(self.app_state, transport)
        super().connection_made(transport)
