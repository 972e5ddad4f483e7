"""The message channel an exec session talks through: one websocket, seen as plain messages.

``bytes`` is data, ``str`` is the end-of-stream barrier (spec §5.3), ``None`` means the peer closed or
the connection broke. Adapters: a Starlette websocket (api/wschannel.py), a relay across nodes.
"""

from __future__ import annotations

from typing import Protocol


class ChannelClosed(Exception):
    """Sending on a channel whose peer has gone."""


class Channel(Protocol):
    async def receive(self) -> bytes | str | None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int = 1000) -> None: ...
