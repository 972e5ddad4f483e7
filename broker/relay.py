"""Member-to-member websocket relay (spec §10): the front end that received the client's websocket opens
a stream to the owning member over their persistent link (broker/mux.py) with the same secret and the
caller's identity, then copies messages both ways, one at a time (a slow side slows the other; nothing
piles up), preserving binary vs text. Between members a message travels as the link's bytes, with no
websocket framing to parse or build."""

from __future__ import annotations

import contextlib

from broker.mux import MuxStream
from core.aio import first_of
from core.channel import Channel, ChannelClosed


async def _copy(source: Channel, sink: Channel) -> None:
    """Messages from ``source`` to ``sink``, binary kept binary, until either side has gone."""
    try:
        while (msg := await source.receive()) is not None:
            if isinstance(msg, bytes):
                await sink.send_bytes(msg)
            else:
                await sink.send_text(msg)
    except ChannelClosed:
        pass


async def relay(client: Channel, upstream: MuxStream) -> bool:
    """Copy messages until either side ends, then close both. True when the owner went away mid-stream
    (the link was lost or the owner closed with an error: its agent may have stopped)."""
    try:
        await first_of(_copy(upstream, client), _copy(client, upstream))
    finally:
        lost = upstream.abnormal
        with contextlib.suppress(Exception):
            await upstream.close()
        await client.close(1011 if lost else 1000)
    return lost
