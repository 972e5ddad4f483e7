"""The exec websocket connection (api/wsconn.py) and the pumps on it (node_agent/pumps.py), against the real
``websockets`` client over a real unix socket, and real pipes. No broker."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from api.fastpath import _accept_key
from api.wsconn import READ_AHEAD, WebSocketConnection, frame_header
from node_agent.fdio import make_pipe, set_nonblocking
from node_agent.pumps import InputPump, OutputPump

MAX = 1 << 20


class _Handshake(asyncio.Protocol):
    """What api/fastpath.py does before the switch: read the request, answer 101, hand the socket over."""

    def __init__(self, made: asyncio.Future[WebSocketConnection], connections: set[object]) -> None:
        self.made = made
        self.connections = connections
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        key = next(line.split(b":", 1)[1].strip() for line in self.buf.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = _accept_key(key)
        assert accept is not None
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                             b"sec-websocket-accept: " + accept + b"\r\n\r\n")
        conn = WebSocketConnection(self.transport, self.connections, MAX, ping_interval=0.2)  # type: ignore[arg-type]
        self.transport.set_protocol(conn)  # type: ignore[attr-defined]
        self.made.set_result(conn)


Pair = tuple[WebSocketConnection, ClientConnection, set[object]]


@pytest.fixture()
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    made: asyncio.Future[WebSocketConnection] = loop.create_future()
    connections: set[object] = set()
    await loop.connect_accepted_socket(lambda: _Handshake(made, connections), ours)
    # max_queue 1: the client takes in no more than it is asked for (its socket fills, as a slow reader's would)
    client = await connect("ws://test/", sock=theirs, compression=None, max_size=None, ping_interval=None,
                           max_queue=1)
    conn = await made
    try:
        yield conn, client, connections
    finally:
        await client.close()
        if not conn.lost:
            conn.transport.abort()


async def until(check: Callable[[], bool], deadline: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + deadline
    while not check():
        assert asyncio.get_running_loop().time() < end, "condition not met in time"
        await asyncio.sleep(0.005)


def test_frame_header_sizes() -> None:
    assert frame_header(0x82, 5) == b"\x82\x05"
    assert frame_header(0x82, 126) == b"\x82\x7e\x00\x7e"
    assert frame_header(0x81, 1 << 16) == b"\x81\x7f" + (1 << 16).to_bytes(8, "big")


def test_accept_key_is_rfc6455s_example() -> None:
    assert _accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert _accept_key(b"short") is None
    assert _accept_key(b"!!!notbase64!!!!!!!!!!==") is None


async def test_messages_both_ways_binary_text_large_and_fragmented(pair: Pair) -> None:
    conn, client, _ = pair
    await client.send(b"\x00bin")
    await client.send("")
    big = os.urandom(3 << 20)
    await client.send(big[:MAX])
    await client.send([b"frag", b"mented"])  # one binary message in two frames
    assert await conn.receive() == b"\x00bin"
    assert await conn.receive() == ""
    assert await conn.receive() == big[:MAX]
    assert await conn.receive() == b"fragmented"
    await conn.send_bytes(big)  # a large frame goes out as header + payload
    await conn.send_text("")
    assert await client.recv() == big
    assert await client.recv() == ""


async def test_port_listen_pause_resume_and_end(pair: Pair) -> None:
    conn, client, _ = pair
    got: list[bytes | str | None] = []
    await client.send(b"early")  # before anyone listens: queued
    await until(lambda: conn._inbox_bytes > 0)
    conn.listen(got.append)
    assert got == [b"early"]
    conn.pause()
    await client.send(b"held")
    await asyncio.sleep(0.05)
    assert got == [b"early"]
    conn.resume()
    await until(lambda: got == [b"early", b"held"])
    await client.close()
    await until(lambda: got[-1:] == [None])
    assert got.count(None) == 1


async def test_reading_stops_past_read_ahead(pair: Pair) -> None:
    """Nobody reads: past READ_AHEAD unread bytes the socket is no longer read (the client's sends block)."""
    conn, client, _ = pair
    chunk = b"x" * (256 << 10)

    async def flood() -> None:
        for _ in range(64):  # 16 MiB, far past what the kernel and the read-ahead hold
            await client.send(chunk)

    sender = asyncio.ensure_future(flood())
    await until(lambda: conn._read_paused)
    await asyncio.sleep(0.1)
    assert not sender.done()
    assert READ_AHEAD <= conn._inbox_bytes <= READ_AHEAD + len(chunk)
    while not sender.done():  # reading again drains it all
        assert await conn.receive() == chunk
    await sender


async def test_offer_reports_backpressure_and_drained_callback(pair: Pair) -> None:
    """Offer until the client (which reads nothing) holds all it will: offer says False, and the drained
    callback comes only once the client reads."""
    conn, client, _ = pair
    chunk = os.urandom(1 << 20)
    loop = asyncio.get_running_loop()
    for _ in range(64):
        while conn.offer(chunk):
            pass
        drained = loop.create_future()
        conn.when_drained(lambda fut=drained: fut.done() or fut.set_result(None))
        await asyncio.sleep(0.2)
        if not drained.done():
            break  # the client's buffers are full: drained waits for it
    assert not drained.done(), "the client never stopped taking data"
    while not drained.done():
        await client.recv()
    await drained


async def test_invalid_utf8_text_closes_1007_and_oversize_1009(pair: Pair) -> None:
    conn, client, _ = pair
    header = bytes([0x81, 0x80 | 2])
    mask = b"\x01\x02\x03\x04"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\xff\xfe"))
    client.transport.write(header + mask + payload)  # a text frame that is not UTF-8
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    assert await conn.receive() is None


async def test_oversize_message_closes_1009(pair: Pair) -> None:
    conn, client, _ = pair
    with pytest.raises(ConnectionClosed) as closed:
        await client.send(b"y" * (MAX + 1))
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert await conn.receive() is None


async def test_keepalive_pings_and_close_handshake(pair: Pair) -> None:
    conn, client, connections = pair
    pongs = await asyncio.wait_for(_next_ping(client), 5)
    assert pongs == b"keepalive"
    assert conn in connections
    conn.shut(1000)
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    await until(lambda: conn.lost)
    assert conn not in connections


async def _next_ping(client: ClientConnection) -> bytes:
    """The payload of the next ping the server sends (the client answers it itself)."""
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    protocol = client.protocol
    original = protocol.recv_frame

    def spy(frame: Frame) -> None:
        if frame.opcode is Opcode.PING and not seen.done():
            seen.set_result(frame.data)
        original(frame)

    protocol.recv_frame = spy  # type: ignore[method-assign]
    return await seen


async def test_close_now_unblocks_a_blocked_sender(pair: Pair) -> None:
    conn, _client, _ = pair  # the client reads nothing
    chunk = os.urandom(1 << 20)

    async def flood() -> None:
        while True:
            await conn.send_bytes(chunk)

    sender = asyncio.ensure_future(flood())
    await until(lambda: conn._write_paused)
    conn.revoke("certificate revoked")
    with pytest.raises(Exception) as err:
        await asyncio.wait_for(sender, 5)
    assert type(err.value).__name__ == "ChannelClosed"


async def test_output_pump_reads_to_the_barrier_after_exit(pair: Pair) -> None:
    """Output is relayed; after the command exited, what is readable is the rest even if a child keeps the
    pipe open (spec §5.8); the barrier follows."""
    conn, client, _ = pair
    r, w = make_pipe()
    done = asyncio.get_running_loop().create_future()
    seen: list[bytes] = []
    pump = OutputPump(r, conn, seen.append, lambda: done.set_result(None))
    os.write(w, b"one")
    assert await client.recv() == b"one"
    os.write(w, b"two")
    pump.exited()  # w stays open: a background child
    await asyncio.wait_for(done, 5)
    assert await client.recv() == b"two"
    assert await client.recv() == ""
    assert seen == [b"one", b"two"]
    os.close(w)
    os.close(r)


async def test_output_pump_waits_for_a_slow_client(pair: Pair) -> None:
    conn, client, _ = pair
    r, w = make_pipe()
    set_nonblocking(w)
    pump = OutputPump(r, conn, lambda _d: None, lambda: None)
    chunk = os.urandom(1 << 20)
    written = 0
    with pytest.raises(BlockingIOError):
        while True:  # the client reads nothing: the pump stops reading, the pipe fills
            written += os.write(w, chunk)
            await asyncio.sleep(0.01)
    assert not pump._reading
    got = 0
    while got < written:
        got += len(await client.recv())
    assert got == written
    pump.stop()
    os.close(w)
    os.close(r)


async def test_input_pump_in_order_past_the_pipe_then_eof(pair: Pair) -> None:
    conn, client, _ = pair
    r, w = make_pipe(big=False)  # 64 KiB: the messages below do not fit
    set_nonblocking(w)
    data = os.urandom(3 << 20)
    counted: list[int] = []
    pump = InputPump(conn, w, lambda d: counted.append(len(d)), owns_fd=True)
    loop = asyncio.get_running_loop()

    def read_all() -> bytes:
        got = bytearray()
        while chunk := os.read(r, 1 << 16):
            got += chunk
        return bytes(got)

    reader = loop.run_in_executor(None, read_all)  # the command, reading its stdin to EOF
    try:
        for i in range(0, len(data), 1 << 20):
            await client.send(data[i:i + (1 << 20)])
        await client.send("")  # the barrier: EOF once everything is written
        got = await asyncio.wait_for(asyncio.shield(reader), 10)
        assert pump.fd is None  # closed by the pump at the barrier: the reader saw EOF
    finally:
        pump.stop()
        await reader
    assert bytes(got) == data
    assert sum(counted) == len(data)
    os.close(r)


async def test_input_pump_takes_what_queued_before_it_started(pair: Pair) -> None:
    """A client sends its whole stdin (many small messages) before the command starts: they queue (reading
    stops past READ_AHEAD), then all reach the command, in order, and EOF after them."""
    conn, client, _ = pair
    data = os.urandom(8 << 20)
    loop = asyncio.get_running_loop()

    async def send_all() -> None:
        for i in range(0, len(data), 64 << 10):
            await client.send(data[i:i + (64 << 10)])
        await client.send("")

    sending = asyncio.ensure_future(send_all())
    await until(lambda: conn._read_paused)
    r, w = make_pipe()
    set_nonblocking(w)

    def read_all() -> bytes:  # the command reads as it comes: the pump may never find the pipe full
        got = bytearray()
        while chunk := os.read(r, 1 << 16):
            got += chunk
        return bytes(got)

    reading = loop.run_in_executor(None, read_all)
    pump = InputPump(conn, w, lambda _d: None, owns_fd=True)
    try:
        got = await asyncio.wait_for(asyncio.shield(reading), 10)
    finally:
        pump.stop()  # the reader's EOF, whatever happened
        await reading
    await sending
    assert got == data
    os.close(r)


async def test_a_client_that_closes_first_gets_the_close_echoed(pair: Pair) -> None:
    """The client's close frame is answered with ours even when whoever listens shuts the socket the moment
    it hears of the end (as an events stream or an exec session does)."""
    conn, client, _ = pair
    conn.listen(lambda msg: conn.shut() if msg is None else None)
    await asyncio.wait_for(client.close(), 5)
    assert client.protocol.close_rcvd is not None and client.protocol.close_rcvd.code == 1000
    await until(lambda: conn.lost)
