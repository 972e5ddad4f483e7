"""A Starlette websocket as a broker Channel (binary = data, text = barrier, None = gone)."""

from __future__ import annotations

import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect

from core.channel import ChannelClosed


class WebSocketChannel:
    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._gone = False

    async def receive(self) -> bytes | str | None:
        if self._gone:
            return None
        try:
            msg = await self._ws.receive()
        except (RuntimeError, WebSocketDisconnect):  # receive after disconnect
            msg = {"type": "websocket.disconnect"}
        if msg["type"] == "websocket.disconnect":
            self._gone = True
            return None
        data = msg.get("bytes")
        if data is not None:
            return data
        return msg.get("text") or ""

    async def send_bytes(self, data: bytes) -> None:
        try:
            await self._ws.send({"type": "websocket.send", "bytes": data})
        except (OSError, RuntimeError, WebSocketDisconnect) as exc:
            raise ChannelClosed(str(exc)) from None

    async def send_text(self, text: str) -> None:
        try:
            await self._ws.send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError, WebSocketDisconnect) as exc:
            raise ChannelClosed(str(exc)) from None

    async def close(self, code: int = 1000) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close(code)
        self._gone = True
