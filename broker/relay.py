"""Member-to-member websocket relay (spec §10): the front end that received the client's websocket dials
the owning member's listener with the same secret and the caller's identity (broker/member_link.py),
then copies frames both ways, one at a time (a slow side slows the other; nothing piles up), preserving
binary vs text."""

from __future__ import annotations

import contextlib

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from core.aio import first_of
from core.channel import Channel, ChannelClosed


async def relay(client: Channel, upstream: ClientConnection) -> bool:
    """Copy frames until either side ends, then close both. True when the owner went away mid-stream
    (its connection ended without a close: its agent may have stopped)."""

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

    try:
        await first_of(down(), up())
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()
        await client.close(close_code)
    return close_code == 1011
