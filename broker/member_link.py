"""This member's client side of the member link: HTTPS and websockets to the other members' member
listeners, with mutual TLS on the cluster certificate (each side must present it; nothing else gets
past the other's handshake). It carries forwarded calls, event batches and relayed exec websockets;
Ray only says who the members are and where they listen. One kept-alive connection pool per member."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from broker import rpc
from core.errors import ApiError, Unavailable
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
    def __init__(self, name: str, cert_path: Path, key_path: Path) -> None:
        self.name = name
        self.ssl = client_context(cert_path, key_path)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._streams: dict[str, httpx.AsyncClient] = {}

    def _client(self, address: str) -> httpx.AsyncClient:
        client = self._clients.get(address)
        if client is None:
            client = httpx.AsyncClient(
                base_url=f"https://{address}", verify=self.ssl, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=32, keepalive_expiry=4.0),
                headers={"User-Agent": f"execbroker-member/{self.name}"})
            self._clients[address] = client
        return client

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
        body = json.dumps({"caller": self.name, "method": method, "args": rpc.encode(list(args))})
        try:
            r = await self._client(address).post("/internal/v1/call", content=body,
                                                  headers={"Content-Type": "application/json"},
                                                  timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))
        except httpx.ConnectError as exc:
            raise Unreachable(f"Cluster member {member} is unreachable: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"Cluster member {member} is unreachable: {type(exc).__name__}") from None
        if r.status_code != 200:
            raise Unavailable(f"Cluster member {member} refused the call: HTTP {r.status_code}")
        return rpc.result(r.json())

    async def send_events(self, member: str, address: str, batch: str) -> None:
        """One batch of events, as its JSON text (a list of [type, metadata, project])."""
        body = f'{{"member": {json.dumps(self.name)}, "batch": {batch}}}'
        try:
            r = await self._client(address).post("/internal/v1/events", content=body,
                                                  headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise Unavailable(f"Cluster member {member} is unreachable: {type(exc).__name__}") from None
        if r.status_code != 200:
            raise Unavailable(f"Cluster member {member} refused events: HTTP {r.status_code}")

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

    async def dial_exec_socket(self, address: str, op_id: str, secret: str, who: Identity,
                               offset: int | None = None) -> ClientConnection:
        """The owner's exec websocket, opened on ``who``'s behalf; its refusal comes back as the same error."""
        url = f"wss://{address}/1.0/operations/{quote(op_id)}/websocket?secret={quote(secret)}"
        if offset is not None:
            url += f"&offset={offset}"
        try:
            return await connect(url, ssl=self.ssl, additional_headers=who.header(), compression=None,
                                 max_size=None, ping_interval=None, open_timeout=10, close_timeout=2)
        except InvalidStatus as exc:
            try:
                message = json.loads(exc.response.body or b"{}").get("error") or "Forbidden"
            except ValueError:
                message = exc.response.reason_phrase
            raise ApiError(message, exc.response.status_code) from None
        except ConnectionRefusedError as exc:
            raise Unreachable(f"Cannot reach the cluster member at {address}: {exc}") from None
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            raise Unavailable(f"Cannot reach the cluster member at {address}: {exc}") from None

    async def forget(self, address: str) -> None:
        for pool in (self._clients, self._streams):
            client = pool.pop(address, None)
            if client is not None:
                await client.aclose()

    async def aclose(self) -> None:
        for address in {*self._clients, *self._streams}:
            await self.forget(address)
