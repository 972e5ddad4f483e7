"""A node's processes hand connections to each other (broker/handoff.py, core/workers.py): which process
a first request belongs to, and the socket itself passed with what was already read of it."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest

from broker import handoff
from core import workers


def test_operation_ids_name_their_process() -> None:
    for process in (0, 1, 7, 63):
        op_id = workers.operation_id(process)
        assert str(uuid.UUID(op_id)) == op_id  # still a UUID, as clients expect
        assert workers.process_of(op_id) == process
    assert len({workers.operation_id(1) for _ in range(1000)}) == 1000
    with pytest.raises(ValueError):
        workers.operation_id(64)
    assert workers.process_of("not-an-id") is None
    assert workers.process_of(str(uuid.UUID(int=0xFF))) is None  # a last byte past 63: nobody's


def test_first_request_owner() -> None:
    op = workers.operation_id(2)
    owner = workers.first_request_owner
    assert owner(f"/1.0/operations/{op}/websocket?secret=x".encode(), 0, 4) == 2
    assert owner(f"/1.0/operations/{op}/wait?timeout=3".encode(), 1, 4) == 2
    assert owner(f"/1.0/operations/{op}".encode(), 2, 4) is None  # its own
    assert owner(f"/1.0/operations/{op}".encode(), 0, 2) is None  # no process 2 here: another member's
    assert owner(b"/1.0/events?type=operation", 1, 4) == 0
    assert owner(b"/1.0/events", 0, 4) is None
    assert owner(b"/1.0/instances/c1/exec", 1, 4) is None
    assert owner(f"/1.0/operations/{op}/../../instances".encode(), 0, 4) is None
    assert workers.request_line(b"GET /1.0 HTTP/1.1\r\nHost: x\r\n") == (b"GET", b"/1.0")
    assert workers.request_line(b"GET /1.0 HTTP/1.1") is None  # incomplete
    assert workers.request_line(b"garbage\r\n") is None


async def test_a_connection_handed_over_keeps_its_bytes_and_its_peer() -> None:
    """The receiver gets the very socket (same peer credentials), and what the first process read comes
    before what the client sends next."""
    ours, theirs = handoff.pair()
    got: asyncio.Queue[tuple[socket.socket, bytes, int]] = asyncio.Queue()
    receiver = handoff.Receiver(theirs, lambda s, d, f: got.put_nowait((s, d, f)))
    accepted: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()

    class First(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            assert handoff.hand(ours, self.transport, data, handoff.STAY)
            accepted.set_result(self.transport)

    a, b = socket.socketpair()
    server_side, client = a, b
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(First, server_side)
    client.sendall(b"GET /1.0 HTTP/1.1\r\n")
    await asyncio.wait_for(accepted, 5)
    sock, data, flags = await asyncio.wait_for(got.get(), 5)
    try:
        assert (data, flags) == (b"GET /1.0 HTTP/1.1\r\n", handoff.STAY)
        assert transport.is_closing()
        client.sendall(b"more")
        sock.setblocking(True)
        assert sock.recv(4) == b"more"
        sock.sendall(b"answer")
        assert client.recv(6) == b"answer"  # the connection outlived the first process's copy
    finally:
        sock.close()
        client.close()
        receiver.close()
        ours.close()


async def test_nothing_is_handed_when_the_receiver_is_gone() -> None:
    ours, theirs = handoff.pair()
    theirs.close()
    a, b = socket.socketpair()
    try:
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, a)
        assert not handoff.hand(ours, transport, b"GET / HTTP/1.1\r\n")
        assert not transport.is_closing()  # served where it landed instead
        assert not handoff.hand(ours, transport, b"x" * (handoff.MAX_HANDED + 1))
        transport.close()
    finally:
        b.close()
        ours.close()


def test_new_connections_spread_by_the_connections_each_process_holds() -> None:
    loads = handoff.Loads()
    try:
        for process, held in enumerate((5, 3, 9)):
            loads.set(process, held)
        assert workers.lighter(2, loads.all(3), [0, 1, 2]) == 1
        assert workers.lighter(0, loads.all(3), [0, 1, 2]) == 1
        assert workers.lighter(1, loads.all(3), [0, 1, 2]) is None  # already the lightest
        loads.set(1, 4)
        assert workers.lighter(0, loads.all(3), [0, 1]) is None  # one apart: balanced enough
        assert workers.lighter(2, loads.all(3), [0, 2]) == 0  # only live processes are candidates
        shared = handoff.Loads(os.dup(loads.fd))  # what a worker maps from the fd it inherited
        shared.add(0, 2)
        assert loads.get(0) == 7
    finally:
        os.close(loads.fd)
