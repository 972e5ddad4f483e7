"""The persistent member link (broker/mux.py, core/muxframe.py) between two real member listeners on
loopback: real uvicorn, real mutual TLS on one cluster certificate, ALPN, no Ray. What each member
serves is a small echo service, so the link itself is what is tested: one dial per pair, calls,
ordered events, streams with their windows, refusals, bounds, loss, and who may connect."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from api.server import ApiServer
from broker import mux
from broker.member_link import MemberLink
from broker.relay import relay
from core import certs
from core.errors import ApiError, NotFound, Unavailable
from core.identity import Identity
from core.muxframe import MAX_PAYLOAD, Decoder, FrameError, Kind, frame


@dataclass
class Echo:
    """A member's service: echo calls, record events, echo streams (or hold them unread)."""

    name: str
    got: list[Any] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    held: list[mux.MuxStream] = field(default_factory=list)
    link: MemberLink | None = None  # for "relay": this member's link, and the member to relay to
    back: tuple[str, str] | None = None
    relays: list[bool] = field(default_factory=list)  # each relay's "owner lost" answer

    async def call(self, peer: str, method: str, args: Any) -> dict[str, Any]:
        self.callers.append(peer)
        if method == "fail":
            return {"error": [404, "no such thing"]}
        if method in ("sleep", "wait_operation"):
            await asyncio.sleep(args[0])
        if method == "huge":
            return {"ok": "x" * args[0]}
        if method == "unencodable":
            return {"ok": {1j}}
        return {"ok": [self.name, method, args]}

    def events(self, peer: str, batch: Any) -> None:
        self.got.append((peer, batch))

    async def open(self, peer: str, request: dict[str, Any], stream: mux.MuxStream,
                   accept: Callable[[], None]) -> None:
        if request["op"] == "refuse":
            raise NotFound("Operation not found")
        accept()
        if request["op"] == "fail":
            raise RuntimeError("the session broke after it was accepted")
        if request["op"] == "hold":  # never reads: its sender must stop at the window
            self.held.append(stream)
            await asyncio.Event().wait()
        if request["op"] == "port":  # echo on the Port side: callbacks, backpressure by offer/when_drained
            await _echo_port(stream)
            return
        if request["op"] == "relay":  # relayed on to the other member's echo, as a front end relays
            assert self.link is not None and self.back is not None
            upstream = await self.link.dial_exec_socket(self.back[0], self.back[1], "op", "s", Identity("a", "unix"))
            self.relays.append(await relay(stream, upstream))
            return
        while (msg := await stream.receive()) is not None:
            if isinstance(msg, bytes):
                await stream.send_bytes(msg)
            else:
                await stream.send_text(msg)
        await stream.close()


async def _echo_port(stream: mux.MuxStream) -> None:
    ended = asyncio.get_running_loop().create_future()

    def message(msg: bytes | str | None) -> None:
        if msg is None:
            ended.done() or ended.set_result(None)
        elif not stream.offer(msg):
            stream.pause()
            stream.when_drained(stream.resume)

    stream.listen(message)
    await ended
    stream.shut()


@dataclass
class Member:
    name: str
    server: ApiServer
    link: MemberLink
    service: Echo
    dials: int = 0

    def dialled(self) -> None:
        self.dials += 1

    @property
    def address(self) -> str:
        return self.server.member_address


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Member, Member]]:
    cert_pem, key_pem = certs.generate("execbroker cluster", ip_addresses=["127.0.0.1"])
    (tmp_path / "c.crt").write_text(cert_pem)
    (tmp_path / "c.key").write_text(key_pem)
    os.chmod(tmp_path / "c.key", 0o600)
    members = []
    for name in ("m1", "m2"):
        server = ApiServer(tmp_path / f"{name}.socket", None)
        server.app = FastAPI()
        server.set_certificate(cert_pem, key_pem, certs.fingerprint(certs.load(cert_pem)))
        link = MemberLink(name, tmp_path / "c.crt", tmp_path / "c.key")
        link.service = Echo(name)
        server.on_member_link = link.accepted
        await server.start_member("127.0.0.1")
        link.address = server.member_address
        member = Member(name, server, link, link.service)
        link.on_dial = member.dialled
        members.append(member)
    try:
        yield members[0], members[1]
    finally:
        for m in members:
            await m.link.aclose()
            await m.server.stop()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_calls_share_one_link_both_ways(pair: tuple[Member, Member]) -> None:
    a, b = pair
    results = await asyncio.gather(*(a.link.call("m2", b.address, "echo", (i,)) for i in range(200)))
    assert results == [["m2", "echo", [i]] for i in range(200)]
    assert await b.link.call("m1", a.address, "echo", ("back",)) == ["m1", "echo", ["back"]]
    assert (a.dials, b.dials) == (1, 0)  # one link for the pair: m2 answered on the one m1 dialled
    assert set(b.service.callers) == {"m1"} and a.service.callers == ["m2"]
    with pytest.raises(ApiError) as err:
        await a.link.call("m2", b.address, "fail", ())
    assert (err.value.status, err.value.message) == (404, "no such thing")


async def test_a_slow_call_does_not_hold_up_the_others(pair: tuple[Member, Member]) -> None:
    a, b = pair
    slow = asyncio.ensure_future(a.link.call("m2", b.address, "sleep", (30,)))
    assert await a.link.call("m2", b.address, "echo", (1,)) == ["m2", "echo", [1]]
    with pytest.raises(Unavailable, match="did not answer within"):
        await a.link.call("m2", b.address, "sleep", (30,), timeout=0.2)
    slow.cancel()


async def test_events_arrive_in_order(pair: tuple[Member, Member]) -> None:
    a, b = pair
    for i in range(500):
        await a.link.send_events("m2", b.address, f'[["operation", {{"n": {i}}}, "default"]]')
    await until(lambda: len(b.service.got) == 500)
    assert [batch[0][1]["n"] for _, batch in b.service.got] == list(range(500))
    assert {peer for peer, _ in b.service.got} == {"m1"}


async def test_a_stream_carries_messages_byte_exact_both_ways(pair: tuple[Member, Member]) -> None:
    a, b = pair
    stream = await a.link.dial_exec_socket("m2", b.address, "op", "secret", Identity("alice", "unix"))
    blob = random.randbytes(1 << 20)
    sent = [blob[i:i + 65536 * k] for k, i in enumerate(range(0, 1 << 20, 65536 * 3), 1)] * 24  # ~24 MiB

    async def send() -> None:
        for chunk in sent:
            await stream.send_bytes(chunk)
        await stream.send_text("")

    got: list[bytes | str] = []

    async def receive() -> None:
        while (msg := await stream.receive()) != "":
            assert msg is not None
            got.append(msg)

    await asyncio.gather(send(), receive())
    assert got == sent  # each message whole, in order, binary kept binary
    await stream.close()
    await until(lambda: a.link.links == 1 and all(c.streams == 0 for c in a.link._all))


async def test_a_refusal_is_the_owners_error(pair: tuple[Member, Member]) -> None:
    a, b = pair
    with pytest.raises(ApiError) as err:
        await a.link.dial_exec_socket("m2", b.address, "refuse", "s", Identity("alice", "unix"))
    assert (err.value.status, err.value.message) == (404, "Operation not found")


async def test_a_reader_that_reads_nothing_stops_its_sender_not_the_link(pair: tuple[Member, Member]) -> None:
    a, b = pair
    held = await a.link.dial_exec_socket("m2", b.address, "hold", "s", Identity("alice", "unix"))
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            await held.send_bytes(b"x" * 65536)
            sent += 65536

    task = asyncio.ensure_future(flood())
    await until(lambda: sent >= mux.WINDOW)
    await asyncio.sleep(0.3)  # time for more: none may go
    assert sent <= mux.WINDOW, sent
    other = await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix"))
    await other.send_bytes(b"still served")
    assert await other.receive() == b"still served"
    task.cancel()
    await other.close()


async def test_losing_the_link_ends_calls_and_streams_at_once(pair: tuple[Member, Member]) -> None:
    a, b = pair
    stream = await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix"))
    call = asyncio.ensure_future(a.link.call("m2", b.address, "sleep", (30,)))
    await until(lambda: "m1" in b.service.callers)
    for conn in list(b.link._all):
        conn.abort()
    with pytest.raises(Unavailable, match="member link was lost"):
        await asyncio.wait_for(call, 5)
    assert await asyncio.wait_for(stream.receive(), 5) is None
    assert stream.abnormal
    assert await a.link.call("m2", b.address, "echo", (2,)) == ["m2", "echo", [2]]  # a new link
    assert a.dials == 2


async def test_a_peer_that_is_gone_is_unreachable(pair: tuple[Member, Member]) -> None:
    a, b = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(Unavailable, match="unreachable: ConnectError"):
        await a.link.call("m9", free, "echo", ())


async def test_only_holders_of_the_cluster_certificate_get_a_link(pair: tuple[Member, Member],
                                                                  tmp_path: Path) -> None:
    _, b = pair
    other_cert, other_key = certs.generate("not the cluster")
    (tmp_path / "o.crt").write_text(other_cert)
    (tmp_path / "o.key").write_text(other_key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(tmp_path / "o.crt", tmp_path / "o.key")
    ctx.set_alpn_protocols([mux.ALPN])
    host, port = b.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="")
    writer.write(frame(Kind.HELLO, 0, b'{"member": "intruder", "address": ""}')
                 + frame(Kind.CALL, 1, b'{"method": "echo", "args": []}'))
    with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.close()
    assert b.service.callers == []


def test_the_decoder_reassembles_frames_from_any_chunking() -> None:
    frames = [(Kind.BINARY, 7, random.randbytes(n)) for n in (0, 1, 9, 65536, 300_000)] + [(Kind.TEXT, 9, b"")]
    wire = b"".join(frame(k, i, p) for k, i, p in frames)
    for _ in range(50):
        dec, got, pos = Decoder(), [], 0
        while pos < len(wire):
            step = random.choice((1, 5, 9, 100, 4096, 70_000))
            got += dec.feed(wire[pos:pos + step])
            pos += step
        assert got == frames and dec.buffered == 0


def test_a_frame_past_its_bound_is_refused_from_its_header() -> None:
    with pytest.raises(FrameError, match="limit"):
        Decoder().feed(frame(Kind.OPEN, 1, b"")[:5] + (MAX_PAYLOAD[Kind.OPEN] + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="unknown frame kind"):
        Decoder().feed(bytes([99]) + bytes(8))


async def test_a_protocol_error_ends_only_that_link(pair: tuple[Member, Member]) -> None:
    a, b = pair
    await a.link.call("m2", b.address, "echo", ())
    (conn,) = [c for c in a.link._all]
    with pytest.raises(mux.TooLarge):  # the sending side keeps the bound...
        conn.send(Kind.CLOSE, 1, b"too long")
    assert conn._transport is not None
    conn._transport.write(frame(Kind.CLOSE, 1, b"too long"))  # ...a peer that broke it loses the link
    await until(lambda: conn.lost)
    assert await a.link.call("m2", b.address, "echo", (3,)) == ["m2", "echo", [3]]


async def test_a_remote_not_found_is_raised_as_not_found(pair: tuple[Member, Member]) -> None:
    """``except NotFound`` holds across members (the owner check relies on it)."""
    a, b = pair
    with pytest.raises(NotFound):
        await a.link.call("m2", b.address, "fail", ())
    with pytest.raises(NotFound):
        await a.link.dial_exec_socket("m2", b.address, "refuse", "s", Identity("alice", "unix"))


async def test_a_reply_too_big_for_a_frame_fails_that_call_only(pair: tuple[Member, Member]) -> None:
    a, b = pair
    stream = await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix"))
    with pytest.raises(ApiError, match="over the member link's") as err:
        await a.link.call("m2", b.address, "huge", (MAX_PAYLOAD[Kind.REPLY] + 1,))
    assert err.value.status == 500
    with pytest.raises(Unavailable, match="dropped"):
        await a.link.send_events("m2", b.address, "[" + " " * MAX_PAYLOAD[Kind.EVENTS] + "]")
    await stream.send_bytes(b"the link is still up")
    assert await stream.receive() == b"the link is still up"
    assert a.dials == 1


async def test_a_reply_that_cannot_be_built_is_an_error_not_a_hang(pair: tuple[Member, Member]) -> None:
    a, b = pair
    with pytest.raises(ApiError, match="internal error") as err:
        await asyncio.wait_for(a.link.call("m2", b.address, "unencodable", ()), 10)
    assert err.value.status == 500


async def test_text_counts_its_bytes_against_the_window(pair: tuple[Member, Member]) -> None:
    a, b = pair
    stream = await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix"))
    text = "\u00e9" * (1 << 19)  # 1 MiB of UTF-8 in 512 Ki characters
    for _ in range(12):  # three windows' worth: a leak of credit would stall it
        await asyncio.wait_for(stream.send_text(text), 10)
        assert await asyncio.wait_for(stream.receive(), 10) == text
    await stream.close()


async def test_a_session_that_fails_after_accepting_closes_abnormally(pair: tuple[Member, Member]) -> None:
    a, b = pair
    stream = await a.link.dial_exec_socket("m2", b.address, "fail", "s", Identity("alice", "unix"))
    assert await asyncio.wait_for(stream.receive(), 10) is None
    assert stream.abnormal and stream.close_code == 1011


async def test_waits_do_not_take_the_calls_slots(pair: tuple[Member, Member], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setattr(mux, "MAX_SERVED_CALLS", 2)
    waits = [asyncio.ensure_future(a.link.call("m2", b.address, "wait_operation", (30,))) for _ in range(5)]
    busy = [asyncio.ensure_future(a.link.call("m2", b.address, "sleep", (30,))) for _ in range(2)]
    await until(lambda: b.service.callers.count("m1") == 7)
    with pytest.raises(ApiError, match="too many calls in flight") as err:
        await a.link.call("m2", b.address, "echo", ())
    assert err.value.status == 503
    for conn in list(b.link._all):  # the link goes: what it served for m1 is cancelled, its callers told
        conn.abort()
    for call in waits + busy:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(call, 5)
    await until(lambda: all(not c._calls_served for c in b.link._all))


async def test_streams_per_link_are_bounded(pair: tuple[Member, Member], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setattr(mux, "MAX_STREAMS", 2)
    held = [await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix")) for _ in range(2)]
    with pytest.raises(Unavailable, match="Too many relayed sockets"):
        await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix"))
    await held[0].close()
    await until(lambda: all(c.streams < 2 for c in b.link._all))  # the owner's end closed too
    again = await a.link.dial_exec_socket("m2", b.address, "op", "s", Identity("alice", "unix"))
    await again.send_bytes(b"room again")
    assert await again.receive() == b"room again"


@pytest.mark.parametrize("op", ["port", "relay"])
async def test_port_streams_and_the_relay_carry_messages_byte_exact_within_the_window(
        pair: tuple[Member, Member], op: str) -> None:
    """A stream served on callbacks (``Port``), and one relayed on to a third stream as a front end relays
    an exec websocket: ~24 MiB both ways, byte exact, whole messages in order, text kept text."""
    a, b = pair
    b.service.link, b.service.back = b.link, ("m1", a.address)
    stream = await a.link.dial_exec_socket("m2", b.address, op, "secret", Identity("alice", "unix"))
    blob = random.randbytes(1 << 20)
    sent = [blob[i:i + 65536 * k] for k, i in enumerate(range(0, 1 << 20, 65536 * 3), 1)] * 24

    async def send() -> None:
        for chunk in sent:
            await stream.send_bytes(chunk)
        await stream.send_text("")

    got: list[bytes | str] = []

    async def receive() -> None:
        while (msg := await stream.receive()) != "":
            assert msg is not None
            got.append(msg)

    await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
    assert got == sent
    await stream.close()
    if op == "relay":
        await until(lambda: b.service.relays == [False])  # ended by the client, not by a lost owner
    await until(lambda: all(c.streams == 0 for link in (a.link, b.link) for c in link._all))
