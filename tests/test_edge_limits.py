"""Bounds at the edge, each with its clear error and the broker serving on after it: request bodies,
request deadlines, connections per listener, live operations per client, websocket message size."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import Broker, wait_for
from tests.wsutil import Raw

pytestmark = pytest.mark.broker


def _response(s: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response off a raw socket: its head and its whole body (by Content-Length)."""
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


def _ok(broker: Broker) -> None:
    assert broker.api("GET", "/1.0")["status_code"] == 200


def _set(broker: Broker, key: str, value: str | None) -> None:
    r = broker.lxc("config", "set", key, value) if value is not None else broker.lxc("config", "unset", key)
    assert r.returncode == 0, r.stderr


@pytest.fixture()
def raw(broker: Broker) -> Raw:
    return Raw(broker.socket)


def test_body_over_the_limit_by_content_length(broker: Broker, c1: str) -> None:
    """Refused on the header: the client is told before it sends the body."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(broker.socket))
        s.sendall(b"POST /1.0/instances/c1/exec HTTP/1.1\r\nHost: eb\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000\r\n\r\n")
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"] == "Request body too large (limit 1048576 bytes)"
    _ok(broker)


@pytest.mark.parametrize("part", ["url", "header"])
def test_request_headers_over_the_limit(broker: Broker, part: str) -> None:
    """A request line or headers past 64 KiB: 431, the connection closed, nothing more read of it."""
    big = b"x" * (100 << 10)
    request = (b"GET /1.0/images/" + big + b" HTTP/1.1\r\nHost: eb\r\n\r\n" if part == "url"
               else b"GET /1.0 HTTP/1.1\r\nHost: eb\r\nX-Big: " + big + b"\r\n\r\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(broker.socket))
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while we were still sending: the answer is already waiting
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 431"), head
    assert json.loads(body)["error"] == "Request header fields too large (limit 65536 bytes)"
    _ok(broker)


def test_a_keep_alive_connections_next_request_is_bounded_too(broker: Broker) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(broker.socket))
        s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: eb\r\n\r\n")
        head, _ = _response(s)
        assert head.startswith(b"HTTP/1.1 200")
        try:
            s.sendall(b"GET /1.0 HTTP/1.1\r\nHost: eb\r\nX-Big: " + b"x" * (100 << 10) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 431"), head
    _ok(broker)


def test_headers_just_under_the_limit_are_served(broker: Broker) -> None:
    with broker.http() as c:
        r = c.get("/1.0", headers={"X-Fill": "y" * (60 << 10)})
    assert r.status_code == 200


def test_chunked_body_over_the_limit(broker: Broker, c1: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            yield b"x" * (512 << 10)

    with broker.http() as c:
        r = c.post("/1.0/instances/c1/exec", content=chunks())
    assert (r.status_code, r.json()["error"]) == (413, "Request body too large (limit 1048576 bytes)")
    _ok(broker)


@pytest.mark.parametrize("sent", [b"", b"GET /1.0 HTTP/1.1\r\nHost: eb\r\n"], ids=["nothing", "half-headers"])
def test_connection_without_a_complete_request_is_closed(broker: Broker, sent: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(broker.socket))
        s.sendall(sent)
        s.settimeout(30)
        assert s.recv(1) == b""  # closed by the server (its deadline is a few seconds)
    _ok(broker)


def test_connection_cap(broker: Broker) -> None:
    _set(broker, "execbroker.max_connections", "8")
    held: list[socket.socket] = []
    try:
        for _ in range(12):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(broker.socket))
            held.append(s)
        # past the cap a connection gets a 503 in the envelope and is closed
        head, body = _response(s)
        assert head.startswith(b"HTTP/1.1 503"), head
        assert json.loads(body)["error"] == "Too many open connections (limit 8)"
    finally:
        for s in held:
            s.close()
        wait_for(lambda: _try_unset(broker), 30, "the cap to be lifted once connections closed")
    _ok(broker)


def _try_unset(broker: Broker) -> bool:
    return broker.lxc("config", "unset", "execbroker.max_connections").returncode == 0


async def test_live_operations_per_client(broker: Broker, raw: Raw, c1: str) -> None:
    _set(broker, "execbroker.max_operations_per_client", "2")
    ops = []
    try:
        ops = [await raw.exec_op(c1, ["true"]) for _ in range(2)]  # Running until their sockets connect
        async with raw.client() as c:
            r = await c.post(f"/1.0/instances/{c1}/exec",
                             json={"command": ["true"], "wait-for-websocket": True})
        assert r.status_code == 429
        assert r.json()["error"] == "Too many running operations for root (limit 2)"
    finally:
        async with raw.client() as c:
            for op in ops:
                await c.delete(f"/1.0/operations/{op['id']}")
        _set(broker, "execbroker.max_operations_per_client", None)
    _ok(broker)


async def test_websocket_message_size(broker: Broker, raw: Raw, c1: str) -> None:
    op = await raw.exec_op(c1, ["cat"])
    socks = {fd: await raw.connect(op, fd) for fd in ("0", "1", "2")}
    try:
        with contextlib.suppress(ConnectionClosed):  # the server may close while the frame is still going out
            await socks["0"].send(b"x" * ((16 << 20) + 1))
        await asyncio.wait_for(socks["0"].wait_closed(), 30)
        assert socks["0"].close_code == 1009  # message too big
        final = await raw.wait(op["id"], 30)
        assert final["status_code"] >= 200  # the session ended; nothing is left running
    finally:
        for ws in socks.values():
            await ws.close()
    _ok(broker)


@pytest.mark.parametrize("request_bytes", [
    b"GET /1.0 HTTP/1.1\r\nHost: eb\r\nContent-Length: x\r\n\r\n",
    b"GET /1.0/instances/a b HTTP/1.1\r\nHost: eb\r\n\r\n",
    b"G\x00T /1.0 HTTP/1.1\r\n\r\n",
])
def test_unparsable_request(broker: Broker, request_bytes: bytes) -> None:
    """What the HTTP parser refuses gets a 400 in the error envelope too, and the connection closed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(broker.socket))
        s.sendall(request_bytes)
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
    assert json.loads(body) == {"type": "error", "status": "", "status_code": 0, "operation": "", "error_code": 400,
                                "error": "Invalid HTTP request received.", "metadata": None}
    _ok(broker)


def _agent(broker: Broker) -> tuple[int, Path]:
    """The agent's pid and its stderr (a Ray worker log)."""
    pid = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    return pid, next((broker.base / "ray" / "ray" / "session_latest" / "logs").glob(f"worker-*-{pid}.err"))


async def test_invalid_utf8_text_is_the_clients_error(broker: Broker, raw: Raw, c1: str) -> None:
    """A text frame that is not UTF-8 closes that socket with 1007 and ends the command's stdin, and
    logs nothing: uvicorn logged an ERROR with a traceback for each one (found by tests/test_fuzz.py)."""
    _, log = _agent(broker)
    logged = log.stat().st_size
    op = await raw.exec_op(c1, ["cat"])
    socks = {fd: await raw.connect(op, fd) for fd in ("0", "1", "2")}
    try:
        await socks["0"].send(b"\xff\xfe", text=True)
        await asyncio.wait_for(socks["0"].wait_closed(), 30)
        assert socks["0"].close_code == 1007
        final = await raw.wait(op["id"], 30)
        assert final["status"] == "Success" and final["metadata"]["return"] == 0  # cat saw EOF
    finally:
        for ws in socks.values():
            await ws.close()
    assert b"UTF-8" not in _tail(log, logged)
    _ok(broker)


def _tail(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


async def test_refused_upgrades_log_no_error(broker: Broker, raw: Raw, c1: str) -> None:
    """A refused websocket (its envelope sent before the upgrade) is the handshake's answer: uvicorn logged
    "ASGI callable returned without completing handshake." as an ERROR for each (found by tests/test_fuzz.py)."""
    _, log = _agent(broker)
    logged = log.stat().st_size
    op = await raw.exec_op(c1, ["cat"])
    try:
        for secret in ("nope", "", op["metadata"]["fds"]["0"] + "&offset=x"):
            status, doc = await raw.handshake_status(f"ws://eb/1.0/operations/{op['id']}/websocket?secret={secret}")
            assert status in (400, 403, 500) and doc["error_code"] == status, (status, doc)
    finally:
        async with raw.client() as c:
            await c.delete(f"/1.0/operations/{op['id']}")
    assert b"ERROR" not in _tail(log, logged)
    _ok(broker)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_pings_from_a_client_that_reads_nothing(broker: Broker, raw: Raw, c1: str) -> None:
    """Every ping is answered; while the pongs are not read the agent stops reading the socket, so it
    holds a bounded amount of them (found by tests/test_fuzz.py: 300 MiB held for 300 MiB of pings)."""
    pid, _ = _agent(broker)
    op = await raw.exec_op(c1, ["cat"])
    socks = {fd: await raw.connect(op, fd) for fd in ("1", "2")}
    reader, writer = await asyncio.open_unix_connection(str(broker.socket))
    try:
        writer.write(f"GET /1.0/operations/{op['id']}/websocket?secret={op['metadata']['fds']['0']} HTTP/1.1\r\n"
                     "Host: eb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101")
        pings = (b"\x89\xfd" + b"\0" * 4 + b"p" * 125) * 8000  # 1 MiB of masked pings (a zero mask key)
        before, sent = _rss_kib(pid), 0
        while sent < 64 << 20:  # never read: the pongs pile up in the agent unless it stops reading
            writer.write(pings)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except asyncio.TimeoutError:
                break  # it stopped reading
            sent += len(pings)
        grown = _rss_kib(pid) - before
        assert grown < 16 << 10, f"the agent grew by {grown >> 10} MiB for {sent >> 20} MiB of pings"
    finally:
        writer.transport.abort()
        async with raw.client() as c:
            await c.delete(f"/1.0/operations/{op['id']}")
        for ws in socks.values():
            await ws.close()
    assert (await raw.wait(op["id"], 30))["status_code"] >= 200
    _ok(broker)


def test_bad_config_values(broker: Broker) -> None:
    for key, value, text in [
        ("execbroker.max_connections", "none", "must be a whole number"),
        ("core.remote_token_expiry", "soon", "Invalid expiry expression"),
        ("core.https_address", "nowhere", "expected IP:PORT"),
        ("no.such.key", "1", "unknown key"),
    ]:
        r = broker.lxc("config", "set", key, value)
        assert r.returncode != 0 and text.encode() in r.stderr, (key, r.stderr)
    _ok(broker)
