"""This member's side of the member link: mutual TLS on the cluster certificate to the other members'
member listeners (each side must present it; nothing else gets past the other's handshake). Calls,
event batches and relayed exec websockets share one persistent multiplexed link per pair of members
(broker/mux.py); relayed file transfers are HTTPS requests on a bounded pool. Ray only says who the
members are and where they listen."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from broker import mux, rpc
from core.errors import Unavailable
from core.identity import Identity

CONNECT_TIMEOUT = 5.0
STREAM_IDLE = 60.0  # seconds a relayed transfer may move nothing
STREAMS_PER_MEMBER = 64  # relayed transfers in flight to one member
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                        "proxy-authenticate", "proxy-authorization", "content-encoding"})


class Unreachable(Unavailable):
    """The request never reached the member (its listener refused the connection): safe to send again."""


def client_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """Present the cluster certificate; accept a peer only if it presents the same one. No hostname
    check: members are reached by address, and only a holder of the cluster key has that certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=str(cert_path))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Proxied:
    """The owner's answer to a relayed request: status, headers and the body as it comes."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            return  # the owner went away mid-body: the client sees a short body
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class MemberLink:
    """Calls, event batches and relayed exec websockets go over one persistent link per peer
    (broker/mux.py), dialled on first use and shared with the peer (a link it dialled serves us too);
    relayed file transfers go as HTTPS requests on a bounded pool of their own."""

    def __init__(self, name: str, cert_path: Path, key_path: Path) -> None:
        self.name = name
        self.address = ""  # this member's listener: what a link's HELLO tells the peer
        self.service: mux.Service | None = None  # what this member serves on its links
        self.ssl = client_context(cert_path, key_path)
        self._link_ssl = client_context(cert_path, key_path)
        self._link_ssl.set_alpn_protocols([mux.ALPN])
        self._links: dict[str, mux.MuxConnection] = {}  # by the peer's listener address
        self._all: set[mux.MuxConnection] = set()  # every open link, dialled or accepted
        self._dialing: dict[str, asyncio.Future[mux.MuxConnection]] = {}
        self._streams: dict[str, httpx.AsyncClient] = {}
        self.on_dial: Callable[[], None] = lambda: None  # a link dialled (metrics)

    # -- the links -------------------------------------------------------------------------------------
    async def link(self, member: str, address: str) -> mux.MuxConnection:
        """The link to whoever listens at ``address``: the one up, else one dialled now."""
        conn = self._links.get(address)
        if conn is not None and not conn.lost:
            return conn
        dialing = self._dialing.get(address)
        if dialing is None:
            dialing = self._dialing[address] = asyncio.ensure_future(self._dial(member, address))
            dialing.add_done_callback(lambda _f: self._dialing.pop(address, None))
        return await asyncio.shield(dialing)

    async def _dial(self, member: str, address: str) -> mux.MuxConnection:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: mux.MuxConnection(self.service, dialer=True, peer=member, on_lost=self._lost),
                host.strip("[]"), int(port), ssl=self._link_ssl, server_hostname="",
                ssl_handshake_timeout=CONNECT_TIMEOUT), CONNECT_TIMEOUT)
        except ConnectionRefusedError:
            raise Unreachable(f"Cluster member {member} is unreachable: ConnectError") from None
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise Unavailable(f"Cluster member {member} is unreachable: {type(exc).__name__}") from None
        if conn.lost:  # gone between its handshake and now
            raise Unavailable(f"Cluster member {member} is unreachable: the member link was lost")
        tls = conn.transport_info("ssl_object")
        if tls is None or tls.selected_alpn_protocol() != mux.ALPN:
            conn.close()
            raise Unavailable(f"Cluster member {member} does not speak {mux.ALPN}")
        self.on_dial()
        conn.hello(self.name, self.address)
        self._links[address] = conn
        self._all.add(conn)
        return conn

    def accepted(self) -> mux.MuxConnection:
        """A link another member dialled (the member listener saw its ALPN): it serves us too."""
        conn = mux.MuxConnection(self.service, dialer=False, on_hello=self._hello, on_lost=self._lost)
        self._all.add(conn)
        return conn

    def _hello(self, conn: mux.MuxConnection, address: str) -> None:
        known = self._links.get(address)
        if address and (known is None or known.lost):
            self._links[address] = conn

    def _lost(self, conn: mux.MuxConnection) -> None:
        self._all.discard(conn)
        for address, known in list(self._links.items()):
            if known is conn:
                del self._links[address]

    @property
    def links(self) -> int:
        return sum(not c.lost for c in self._links.values())

    def _stream_client(self, address: str) -> httpx.AsyncClient:
        """Relayed file transfers get connections of their own (long transfers never starve the calls
        and events), a bounded number of them, and an idle bound: a transfer that moves nothing for
        ``STREAM_IDLE`` seconds is cut."""
        client = self._streams.get(address)
        if client is None:
            client = httpx.AsyncClient(
                base_url=f"https://{address}", verify=self.ssl,
                timeout=httpx.Timeout(STREAM_IDLE, connect=CONNECT_TIMEOUT, pool=STREAM_IDLE),
                limits=httpx.Limits(max_connections=STREAMS_PER_MEMBER, max_keepalive_connections=8,
                                    keepalive_expiry=4.0),
                headers={"User-Agent": f"execbroker-member/{self.name}"})
            self._streams[address] = client
        return client

    async def call(self, member: str, address: str, method: str, args: tuple[Any, ...],
                   timeout: float | None = None) -> Any:
        """``method(*args)`` on the member's NodeService; its ApiError is raised here as is."""
        conn = await self.link(member, address)
        try:
            reply = json.loads(await conn.call(method, rpc.encode(list(args)), timeout))
        except ValueError:
            raise Unavailable(f"Cluster member {member} sent a malformed reply") from None
        return rpc.result(reply)

    async def send_events(self, member: str, address: str, batch: str) -> None:
        """One batch of events, as its JSON text (a list of [type, metadata, project])."""
        await (await self.link(member, address)).send_events(batch)

    async def stream(self, member: str, address: str, method: str, path: str, params: dict[str, str],
                     headers: dict[str, str], body: AsyncIterator[bytes] | None, who: Identity) -> Proxied:
        """A client's request relayed as is to the owner's member listener (files: streamed both ways,
        one chunk in flight); the caller must ``aclose()`` the answer."""
        client = self._stream_client(address)
        request = client.build_request(method, path, params=params, headers={**headers, **who.header()},
                                       content=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.PoolTimeout:
            raise Unavailable(f"Too many transfers to cluster member {member} at once; try again") from None
        except httpx.ConnectError as exc:
            raise Unreachable(f"Cluster member {member} is unreachable: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"Cluster member {member} is unreachable: {type(exc).__name__}") from None
        return Proxied(response)

    async def dial_exec_socket(self, member: str, address: str, op_id: str, secret: str, who: Identity,
                               offset: int | None = None) -> mux.MuxStream:
        """The owner's exec websocket, opened on ``who``'s behalf as a stream of the link; its refusal
        comes back as the same error."""
        conn = await self.link(member, address)
        return await conn.open_stream(rpc.socket_request(op_id, secret, who, offset))

    async def forget(self, address: str) -> None:
        """Drop what leads to ``address`` (a member that moved or was lost): its link is cut at once, so
        whatever still used it ends now rather than when TCP gives up."""
        conn = self._links.pop(address, None)
        if conn is not None:
            conn.abort()
        client = self._streams.pop(address, None)
        if client is not None:
            await client.aclose()

    async def aclose(self) -> None:
        for address in {*self._links, *self._streams}:
            await self.forget(address)
        for conn in list(self._all):
            conn.close()
