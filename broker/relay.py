"""Member-to-member websocket relay (spec §10): the front end that received the client's websocket dials
the owning member's listener with the same secret and the caller's identity, then copies frames both
ways, one at a time (a slow side slows the other; nothing piles up), preserving binary vs text."""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake, InvalidStatus

from core.channel import Channel, ChannelClosed
from core.errors import ApiError, Unavailable
from core.identity import Identity

TOKEN_HEADER = "X-Execbroker-Token"
USER_HEADER = "X-Execbroker-Forwarded-Username"
PROTOCOL_HEADER = "X-Execbroker-Forwarded-Protocol"


def forwarded_headers(token: str, who: Identity) -> dict[str, str]:
    return {TOKEN_HEADER: token, USER_HEADER: who.username, PROTOCOL_HEADER: who.protocol}


async def dial(address: str, op_id: str, secret: str, who: Identity, token: str) -> ClientConnection:
    """Open the owner's exec websocket; its refusal comes back as the same error."""
    url = f"ws://{address}/1.0/operations/{quote(op_id)}/websocket?secret={quote(secret)}"
    try:
        return await connect(url, additional_headers=forwarded_headers(token, who), compression=None,
                             max_size=None, ping_interval=None, open_timeout=10, close_timeout=2)
    except InvalidStatus as exc:
        try:
            message = json.loads(exc.response.body or b"{}").get("error") or "Forbidden"
        except ValueError:
            message = exc.response.reason_phrase
        raise ApiError(message, exc.response.status_code) from None
    except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
        raise Unavailable(f"Cannot reach the cluster member at {address}: {exc}") from None


async def relay(client: Channel, upstream: ClientConnection) -> None:
    """Copy frames until either side ends, then close both."""

    close_code = 1000

    async def down() -> None:
        nonlocal close_code
        try:
            async for msg in upstream:
                if isinstance(msg, bytes):
                    await client.send_bytes(msg)
                else:
                    await client.send_text(msg)
        except ConnectionClosedError:
            close_code = 1011  # the owner went away mid-stream: the client sees an error, not a clean end
        except (ConnectionClosed, ChannelClosed):
            pass

    async def up() -> None:
        while (msg := await client.receive()) is not None:
            await upstream.send(msg)

    tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await upstream.close()
        await client.close(close_code)
