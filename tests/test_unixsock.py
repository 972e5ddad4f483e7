"""Connecting to a unix socket whose backlog is full (node_agent/runtime/unixsock.py): the connect waits
until the listener takes it, and what it returns is connected (asyncio's own sock_connect returns an
unconnected socket there: the first test shows it, so the second cannot pass by accident)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from node_agent.runtime.unixsock import connect_unix, open_unix


def _listener(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.setblocking(False)
    return srv


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def test_asyncio_sock_connect_reports_success_past_a_full_backlog(tmp_path: Path) -> None:
    srv = _listener(tmp_path / "s")
    loop = asyncio.get_running_loop()
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for s in socks:
            s.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(s, str(tmp_path / "s")), 2)
        assert not all(_connected(s) for s in socks)  # what connect_unix exists for
    finally:
        for s in socks:
            s.close()
        srv.close()


async def test_connect_unix_waits_for_room_and_connects(tmp_path: Path) -> None:
    srv = _listener(tmp_path / "s")
    clients = [asyncio.ensure_future(open_unix(str(tmp_path / "s"), timeout=10)) for _ in range(6)]
    accepted = []
    try:
        await asyncio.sleep(0.1)
        assert sum(c.done() for c in clients) < len(clients)  # past the backlog: still waiting
        while len(accepted) < len(clients):  # the listener takes them, one at a time
            try:
                accepted.append(srv.accept()[0])
            except BlockingIOError:
                await asyncio.sleep(0.01)
        socks = await asyncio.wait_for(asyncio.gather(*clients), 10)
        assert all(_connected(s) for s in socks)
        for s in socks:
            s.close()
    finally:
        for c in accepted:
            c.close()
        srv.close()


async def test_connect_unix_gives_up_at_its_deadline(tmp_path: Path) -> None:
    srv = _listener(tmp_path / "s")
    held = [await open_unix(str(tmp_path / "s")) for _ in range(2)]  # the backlog, full
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        with pytest.raises(ConnectionRefusedError, match="backlog stayed full"):
            await connect_unix(sock, str(tmp_path / "s"), timeout=0.3)
    finally:
        sock.close()
        for s in held:
            s.close()
        srv.close()
