"""The IO-free core of an exec session: which sockets are attached, when the command may start, and
what a disconnect means (spec §5.2, §5.4, §5.6). Events in, decisions out; the asyncio adapter is
node_agent/session.py."""

from __future__ import annotations

from enum import Enum

from core.errors import ApiError, Forbidden
from core.execspec import CONTROL, find_socket, required_sockets, socket_secrets


class Phase(Enum):
    WAITING = "waiting"  # for the required sockets
    RUNNING = "running"
    EXITED = "exited"  # the command has ended; output may still drain
    CLOSED = "closed"


class SessionState:
    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.secrets = socket_secrets(interactive)
        self.required = required_sockets(interactive)
        self.attached: set[str] = set()
        self.phase = Phase.WAITING

    def claim(self, secret: str) -> str:
        """Reserve the socket a secret names, before the websocket upgrade (so rejects are HTTP errors)."""
        if not secret:
            raise ApiError("missing secret", 500)
        fd = find_socket(self.secrets, secret)
        if fd is None:
            raise Forbidden("Forbidden")
        if fd in self.attached:
            raise ApiError("Websocket number already connected", 409)
        if self.phase is Phase.CLOSED:
            raise ApiError("Only running operations can be connected", 500)
        self.attached.add(fd)
        return fd

    def release(self, fd: str) -> None:
        """A claimed socket whose upgrade failed."""
        self.attached.discard(fd)

    @property
    def ready(self) -> bool:
        return self.required <= self.attached

    @property
    def control_attached(self) -> bool:
        return CONTROL in self.attached

    @property
    def alive(self) -> bool:
        return self.phase is Phase.RUNNING

    def control_lost_kills(self) -> bool:
        """Control close or error while the command runs kills it."""
        return self.alive

    def stdout_activity_kills(self) -> bool:
        """Without a control socket, a message or disconnect on socket 1 is how a vanished client shows."""
        return self.alive and not self.control_attached
