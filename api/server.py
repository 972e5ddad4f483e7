"""Serve the app with uvicorn on a unix socket, inside the caller's event loop (the agent actor's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from api.peercred import PeerCredHttpProtocol, PeerCredWebSocketProtocol

log = logging.getLogger(__name__)


def bind_unix(path: Path, mode: int = 0o660) -> socket.socket:
    """Bind the API socket, replacing a stale one (a live server answering on it is an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise RuntimeError(f"another server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _EmbeddedServer(uvicorn.Server):
    """The embedding process owns the signals (the agent actor, a test, the CLI)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_tcp(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class ApiServer:
    """uvicorn without its signal handling, on already bound sockets: the node's unix socket and,
    in a cluster, a TCP listener for member-to-member traffic (``member_host``, ephemeral port)."""

    def __init__(self, app: FastAPI, path: Path, mode: int = 0o660, member_host: str | None = None) -> None:
        self.path = path
        self._sock = bind_unix(path, mode)
        self._tcp = bind_tcp(member_host) if member_host else None
        config = uvicorn.Config(
            app,
            http=PeerCredHttpProtocol,  # httptools: the C parser (h11 was ~8% of an exec's CPU)
            proxy_headers=False,  # nothing proxies a unix socket
            ws=PeerCredWebSocketProtocol,
            ws_per_message_deflate=False,  # compression costs 30x throughput on exec streams
            ws_ping_interval=10.0,  # keepalive pings, never fatal (spec §5.7)
            ws_ping_timeout=None,
            ws_max_size=16 << 20,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            backlog=1024,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sockets = [self._sock] + ([self._tcp] if self._tcp is not None else [])
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    @property
    def member_address(self) -> str:
        """host:port of the member listener ("" without one)."""
        if self._tcp is None:
            return ""
        host, port = self._tcp.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        self._sock.close()
        if self._tcp is not None:
            self._tcp.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
