"""Member-to-member websocket relay (spec §10): the front end that received the client's websocket opens
a stream to the owning member over their persistent link (broker/mux.py) with the same secret and the
caller's identity, then passes messages both ways on callbacks (both ends are ``core.channel.Port``s: no
task per direction), binary kept binary, text kept text. A side that is behind pauses the other (nothing
piles up); when either side ends, both are closed. Between members a message travels as the link's bytes,
with no websocket framing to parse or build."""

from __future__ import annotations

import asyncio

from broker.mux import MuxStream
from core.channel import Port


def _pipe(source: Port, sink: Port, ended: asyncio.Future[None]) -> None:
    """Every message of ``source`` to ``sink``, ``source`` paused while ``sink`` is behind."""

    def message(msg: bytes | str | None) -> None:
        if msg is None:
            if not ended.done():
                ended.set_result(None)
            return
        if not sink.offer(msg):
            source.pause()
            sink.when_drained(source.resume)

    source.listen(message)


async def relay(client: Port, upstream: MuxStream) -> bool:
    """Pass messages until either side ends, then close both. True when the owner went away mid-stream
    (the link was lost or the owner closed with an error: its agent may have stopped)."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _pipe(upstream, client, ended)
    _pipe(client, upstream, ended)
    try:
        await ended
    finally:
        lost = upstream.abnormal
        upstream.shut()
        client.shut(1011 if lost else 1000)
    return lost
