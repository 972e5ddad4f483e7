"""A raw Incus exec client for protocol tests: every step explicit, nothing hidden."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


@dataclass
class Raw:
    socket: Path

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                 base_url="http://eb", timeout=30)

    async def post_exec(self, instance: str, body: dict[str, Any], project: str = "default") -> httpx.Response:
        async with self.client() as c:
            return await c.post(f"/1.0/instances/{instance}/exec", content=json.dumps(body),
                                params={"project": project} if project != "default" else None)

    async def exec_op(self, instance: str, command: list[str], project: str = "default", **kw: Any) -> dict[str, Any]:
        body = {"command": command, "wait-for-websocket": True, "interactive": False, **kw}
        r = await self.post_exec(instance, body, project)
        assert r.status_code == 202, r.text
        return r.json()["metadata"]

    async def connect(self, op: dict[str, Any], fd: str) -> ClientConnection:
        secret = op["metadata"]["fds"][fd]
        return await unix_connect(str(self.socket), f"ws://eb/1.0/operations/{op['id']}/websocket?secret={secret}",
                                  compression=None, max_size=None, ping_interval=None)

    async def get_op(self, op_id: str) -> httpx.Response:
        async with self.client() as c:
            return await c.get(f"/1.0/operations/{op_id}")

    async def wait(self, op_id: str, timeout: float = 30) -> dict[str, Any]:
        async with self.client() as c:
            r = await c.get(f"/1.0/operations/{op_id}/wait?timeout={int(timeout)}")
            assert r.status_code == 200, r.text
            return r.json()["metadata"]

    async def handshake_status(self, url: str) -> tuple[int, dict[str, Any]]:
        """Try an upgrade that should be refused: the HTTP status and error envelope."""
        try:
            ws = await unix_connect(str(self.socket), url, compression=None)
        except InvalidStatus as exc:
            return exc.response.status_code, json.loads(exc.response.body or b"{}")
        await ws.close()
        return 101, {}


async def read_stream(ws: ClientConnection) -> bytes:
    """Binary frames until the empty-text barrier (or close)."""
    out = bytearray()
    try:
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                break
            out += msg
    except ConnectionClosed:
        pass
    return bytes(out)


async def run(raw: Raw, instance: str, command: list[str], stdin: bytes = b"", **kw: Any
              ) -> tuple[int, bytes, bytes, dict[str, Any]]:
    """A whole non-interactive exec: (return, stdout, stderr, final operation)."""
    op = await raw.exec_op(instance, command, **kw)
    ctl = await raw.connect(op, "control")
    s0 = await raw.connect(op, "0")
    s1 = await raw.connect(op, "1")
    s2 = await raw.connect(op, "2")

    async def feed() -> None:
        try:  # the server may already have closed socket 0 when the command ignores stdin
            for i in range(0, len(stdin), 1 << 20):
                await s0.send(stdin[i:i + (1 << 20)])
            await s0.send("")
        except ConnectionClosed:
            pass

    # stdin and the outputs at once, as real clients do: a command like cat needs both to flow
    _, out, err = await asyncio.gather(feed(), read_stream(s1), read_stream(s2))
    final = await raw.wait(op["id"])
    for ws in (s0, s1, s2, ctl):
        await ws.close()
    return final["metadata"].get("return", -1), out, err, final
