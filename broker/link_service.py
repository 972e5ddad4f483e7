"""What this member serves to the other members on their persistent links (broker/mux.py): calls to its
NodeService, event batches of their origin, and the exec websockets of its operations that their
clients opened. Only members get a link (the member listener's TLS handshake), so the identity a
stream names is the one the relaying member vouches for, as with the forwarded identity header."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker import rpc
from broker.frontend import WORKER_ADDRESS, Frontend
from broker.mux import MuxStream
from broker.relay import relay


class LinkService:
    PEER = "cluster member "  # how a malformed request names who sent it
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def call(self, peer: str, method: str, args: Any) -> dict[str, Any]:
        if self.frontend.link is not None:
            await self.frontend.link.note_peer(peer)
        return await self.frontend.serve_call(method, args)

    async def _owner(self, op_id: str) -> str:
        """Where a stream for ``op_id`` goes when not to a session here: a worker process of ours."""
        worker = self.frontend.worker_of(op_id)
        return f"{WORKER_ADDRESS}{worker}" if worker is not None else ""

    def events(self, peer: str, batch: Any) -> None:
        if not isinstance(batch, list):
            raise TypeError("events: a batch is a list")
        self.frontend.receive_events(peer, [tuple(e) for e in batch])  # type: ignore[misc]

    async def open(self, peer: str, request: dict[str, Any], stream: MuxStream,
                   accept: Callable[[], None]) -> None:
        op_id, secret, who, offset = rpc.read_socket_request(request, f"{self.PEER}{peer}")
        owner = await self._owner(op_id)
        if owner:  # another process runs it: relayed on to its link
            upstream = await self.frontend.dial_owner(owner, op_id, secret, who, offset)
            accept()
            await relay(stream, upstream)
            return
        session, fd = self.frontend.claim_websocket(op_id, secret, who, offset)
        try:
            accept()
        except BaseException:
            session.release(fd)
            raise
        await session.attach(fd, stream)
