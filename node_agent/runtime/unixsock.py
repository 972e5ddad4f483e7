"""Connecting to a unix socket from the event loop, as every part of the project does it (the agent to an
instance's pid1, the clients to the API socket).

A unix connect never runs in the background: EAGAIN means the listener's backlog is full and nothing
happened, so it is tried again. asyncio's ``sock_connect`` (and so ``open_unix_connection`` and websockets'
``unix_connect``) waits for writability instead and reports success on a socket that is not connected
(measured, Python 3.11: every connect past a full backlog); a burst of execs then saw spawns fail with
"Transport endpoint is not connected", and clients' requests with a broken pipe.
"""

from __future__ import annotations

import asyncio
import socket

CONNECT_RETRY = 0.002  # seconds before the first retry of a connect refused for a full backlog (doubling)
CONNECT_TIMEOUT = 10.0


async def connect_unix(sock: socket.socket, address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect a non-blocking AF_UNIX socket, waiting (up to ``timeout``) while the backlog is full."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = CONNECT_RETRY
    while True:
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            if loop.time() + delay > deadline:
                raise ConnectionRefusedError(f"{address}: its backlog stayed full for {timeout:.0f} s") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


async def open_unix(path: str, kind: int = socket.SOCK_STREAM, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A non-blocking AF_UNIX socket connected to ``path``."""
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        await connect_unix(sock, path, timeout)
    except BaseException:
        sock.close()
        raise
    return sock
