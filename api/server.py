"""The node's listeners, each a uvicorn server inside the caller's loop (the agent actor's), without
uvicorn's signal handling, all serving the same app:

* the unix socket (always): mode 0660, group ``execbroker`` (root only where the group is missing);
* the member listener (in a cluster): TLS with the cluster certificate, for members only; a peer that
  does not present the cluster certificate is cut off after the handshake, before any byte is parsed;
  a member that negotiates ALPN ``execbroker-link/1`` gets ``on_member_link()``'s protocol (its
  persistent link) instead of HTTP;
* the HTTPS listener (``core.https_address``): TLS with the cluster certificate; any client certificate
  is taken and identified by its fingerprint (api/auth.py decides what it may do). Re-bound at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from OpenSSL import SSL

from api.connection import EdgeWebSocketProtocol, Limits, Route, http_protocol, tls_http_protocol
from api.fastpath import FastPath
from api.tls import TLSTransport, server_context
from api.wsconn import MAX_MESSAGE as WS_MAX_MESSAGE
from core.errors import BadRequest

log = logging.getLogger(__name__)
LINK_ALPN = b"execbroker-link/1"  # broker/mux.py's persistent member link (api/ may not import broker/)


def bind_unix(path: Path, group: int | None) -> socket.socket:
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
    old = os.umask(0o177)  # never reachable by others, not even between bind and chmod
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None and os.geteuid() == 0:
        os.chown(path, 0, group)
        os.chmod(path, 0o660)
    sock.listen(socket.SOMAXCONN)  # as many as the kernel allows: a burst of clients waits, none is refused
    sock.setblocking(False)
    return sock


def bind_tcp(address: str) -> socket.socket:
    """``host:port`` (port 0: any free one), ``[v6]:port`` for IPv6."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so (else Nagle holds each
    # response's second segment for the client's delayed ACK: 40 ms per request, measured)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _EmbeddedServer(uvicorn.Server):
    """The embedding process owns the signals (the agent actor, a test, the CLI)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Running:
    """One listener: its socket and the uvicorn server on it."""

    def __init__(self, app: FastAPI, sock: socket.socket, http: Callable[..., asyncio.Protocol]) -> None:
        self.sock = sock
        config = uvicorn.Config(
            app,
            http=http,  # type: ignore[arg-type]
            proxy_headers=False,  # nothing proxies us
            ws=EdgeWebSocketProtocol,
            ws_per_message_deflate=False,  # compression costs 30x throughput on exec streams
            ws_ping_interval=10.0,  # keepalive pings, never fatal (spec §5.7)
            ws_ping_timeout=None,
            ws_max_size=WS_MAX_MESSAGE,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            backlog=socket.SOMAXCONN,  # as bind_unix: uvicorn listens again on the socket it is given
        )
        self.server = _EmbeddedServer(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)

    def adopt(self, sock: socket.socket, preface: bytes) -> None:
        """Serve a connection another process accepted (api/handoff.py), ``preface`` being what it read."""
        server = self.server

        def protocol() -> asyncio.Protocol:
            made: asyncio.Protocol = server.config.http_protocol_class(  # type: ignore[call-arg]
                config=server.config, server_state=server.server_state, app_state=server.lifespan.state,
                route=None, preface=preface)
            return made

        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(protocol, sock))
        _adopting.add(task)
        task.add_done_callback(_adopted)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task
        self.sock.close()


_adopting: set[asyncio.Task[Any]] = set()


def _adopted(task: asyncio.Task[Any]) -> None:
    _adopting.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("a handed connection could not be served: %s", task.exception())


class ApiServer:
    """The listeners of one node. ``app`` must be set before any listener starts; the unix socket is
    bound at once (so a second server on the same data dir fails early) and served by ``start``."""

    def __init__(self, path: Path, group: int | None, limits: Limits | None = None,
                 unix_sock: socket.socket | None = None) -> None:
        self.app: FastAPI | None = None
        self.fast: FastPath | None = None  # the exec hot path every listener serves (api/fastpath.py)
        self.path = path
        self.limits = limits or Limits()
        self._owns_path = unix_sock is None  # a worker serves the socket its agent bound
        self._unix_sock = unix_sock if unix_sock is not None else bind_unix(path, group)
        self._unix: _Running | None = None
        self._workers: _Running | None = None
        self._workers_path: Path | None = None
        self.route: Route | None = None  # the unix socket's first-request router (a node with workers)
        self._member: _Running | None = None
        self._https: _Running | None = None
        self._tls_context: SSL.Context | None = None
        self._cluster_fingerprint = ""
        self.on_https_client: Callable[[str, TLSTransport], None] | None = None
        self.on_member_link: Callable[[], asyncio.Protocol] | None = None  # a member's persistent link

    def _app(self) -> FastAPI:
        assert self.app is not None, "ApiServer.app is not set"
        return self.app

    async def start(self) -> None:
        self._unix = _Running(self._app(), self._unix_sock, http_protocol("unix", self.limits, self.route, self.fast))
        await self._unix.start()

    @property
    def unix_socket(self) -> socket.socket:
        return self._unix_sock

    def adopt(self, sock: socket.socket, preface: bytes) -> None:
        """A unix-socket connection another process of the node handed over (api/handoff.py)."""
        if self._unix is None:
            sock.close()
            return
        self._unix.adopt(sock, preface)

    async def start_workers(self, path: Path) -> None:
        """The socket this node's worker processes send what they do not serve to (our uid only)."""
        self._workers = _Running(self._app(), bind_unix(path, None), http_protocol("worker", self.limits, fast=self.fast))
        self._workers_path = path
        await self._workers.start()

    def set_certificate(self, cert_pem: str, key_pem: str, fingerprint: str) -> None:
        """The cluster certificate: what both TLS listeners present, and what members must present."""
        self._tls_context = server_context(cert_pem, key_pem)
        self._member_context = server_context(cert_pem, key_pem, require_client_cert=True, alpn=(LINK_ALPN,))
        self._cluster_fingerprint = fingerprint

    async def start_member(self, host: str) -> None:
        assert self._tls_context is not None, "set_certificate first"
        self._member = _Running(self._app(), bind_tcp(f"{host}:0"),
                                tls_http_protocol("member", self.limits, lambda: self._member_context,
                                                  self._accept_member, self.fast))
        await self._member.start()

    def _accept_member(self, fingerprint: str, transport: TLSTransport) -> bool:
        ok = bool(fingerprint) and hmac.compare_digest(fingerprint, self._cluster_fingerprint)
        if not ok:
            log.warning("member listener: refused a peer without the cluster certificate")
        elif transport.get_extra_info("alpn_protocol") == LINK_ALPN:
            if self.on_member_link is None:
                return False
            transport.set_protocol(self.on_member_link())  # the link's frames, not HTTP, from here on
        return ok

    def _accept_client(self, fingerprint: str, transport: TLSTransport) -> bool:
        if self.on_https_client is not None:
            self.on_https_client(fingerprint, transport)
        return True

    async def set_https(self, address: str) -> None:
        """Listen on ``address`` (``host:port``) instead of wherever before; "" stops. A bind error is
        raised before anything changes."""
        if self._https is not None and address == address_of(self._https.sock):
            return
        new = None
        if address:
            assert self._tls_context is not None, "set_certificate first"
            try:
                sock = bind_tcp(address)
            except OSError as exc:
                raise BadRequest(f"cannot listen on {address}: {exc.strerror}") from None
            new = _Running(self._app(), sock, tls_http_protocol("https", self.limits, lambda: self._tls_context,
                                                             self._accept_client, self.fast))
            await new.start()
        old, self._https = self._https, new
        if old is not None:
            await old.stop()

    @property
    def member_address(self) -> str:
        """host:port of the member listener ("" without one)."""
        return address_of(self._member.sock) if self._member is not None else ""

    @property
    def https_address(self) -> str:
        return address_of(self._https.sock) if self._https is not None else ""

    async def stop(self) -> None:
        for running in (self._https, self._member, self._workers, self._unix):
            if running is not None:
                await running.stop()
        self._unix_sock.close()
        for path in (self.path if self._owns_path else None, self._workers_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

