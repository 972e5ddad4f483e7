"""The message channel an exec session talks through: one websocket, seen as plain messages.

``bytes`` is data, ``str`` is the end-of-stream barrier (spec §5.3), ``None`` means the peer closed or
the connection broke. Adapters: an exec websocket (api/wsconn.py), a stream of the member link (broker/mux.py).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Protocol


class ChannelClosed(Exception):
    """Sending on a channel whose peer has gone."""


class Channel(Protocol):
    async def receive(self) -> bytes | str | None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def send_text(self, text: str) -> None: ...

    async def close(self, code: int = 1000) -> None: ...


async def send(channel: Channel, msg: bytes | str) -> None:
    """``msg`` on ``channel``: text as text (the barrier), bytes as binary."""
    if isinstance(msg, str):
        await channel.send_text(msg)
    else:
        await channel.send_bytes(msg)


Receiver = Callable[[bytes | str | None], None]


class Port(Protocol):
    """A channel driven by callbacks instead of awaits: what an exec session runs its sockets on, so that
    a session holds no task per socket (node_agent/pumps.py). ``api/wsconn.py`` is one natively; any
    ``Channel`` becomes one through ``ChannelPort``."""

    def listen(self, receiver: Receiver) -> None:
        """Deliver every message from now on to ``receiver`` (those already queued first), and ``None``
        once, when no more will come (the peer closed, the connection broke, or ``shut``)."""

    def pause(self) -> None:
        """Deliver nothing until ``resume``: messages wait, and the peer is no longer read."""

    def resume(self) -> None: ...

    def offer(self, data: bytes | str) -> bool:
        """Send ``data`` now (bytes: data, str: the barrier). False: the peer is behind; offer nothing more
        until the ``when_drained`` callback. On a channel whose peer has gone, data is dropped (True)."""

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the channel takes data again (or has gone)."""

    def shut(self, code: int = 1000) -> None:
        """Close after what was offered: the peer gets ``code``."""


class ChannelPort:
    """A ``Port`` over an awaitable ``Channel`` (a member link's stream): one task reads while listened
    to, one sends while there is something to send."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._receiver: Receiver | None = None
        self._resumed: asyncio.Future[None] | None = None
        self._outbox: collections.deque[bytes | str] = collections.deque()
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._drained: list[Callable[[], None]] = []
        self._shut: int | None = None
        self._gone = False

    def listen(self, receiver: Receiver) -> None:
        self._receiver = receiver
        if self._reader is None:
            self._reader = self._loop.create_task(self._read())

    def pause(self) -> None:
        if self._resumed is None:
            self._resumed = self._loop.create_future()

    def resume(self) -> None:
        if self._resumed is not None:
            if not self._resumed.done():
                self._resumed.set_result(None)
            self._resumed = None

    def offer(self, data: bytes | str) -> bool:
        if self._gone or self._shut is not None:
            return True
        self._outbox.append(data)
        self._send_soon()
        return len(self._outbox) <= 1

    def when_drained(self, callback: Callable[[], None]) -> None:
        if self._outbox and not self._gone:
            self._drained.append(callback)
        else:
            self._loop.call_soon(callback)

    def shut(self, code: int = 1000) -> None:
        if self._shut is None:
            self._shut = code
            self._send_soon()

    async def _read(self) -> None:
        msg: bytes | str | None = b""
        try:
            while msg is not None:
                while self._resumed is not None:
                    await self._resumed
                msg = await self.channel.receive()
                if self._receiver is not None:
                    self._receiver(msg)
        except asyncio.CancelledError:
            if self._receiver is not None:
                self._receiver(None)
            raise

    def _send_soon(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = self._loop.create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._outbox:
                try:
                    await send(self.channel, self._outbox[0])
                except ChannelClosed:
                    self._gone = True
                    self._outbox.clear()
                    break
                self._outbox.popleft()
            for callback in self._drained:
                callback()
            self._drained.clear()
            if self._shut is not None:
                await self.channel.close(self._shut)
                if self._reader is not None:
                    self._reader.cancel()
        finally:
            self._sender = None
