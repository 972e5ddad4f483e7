"""Connections handed between a node's front-end processes (core/workers.py).

The process that accepted a connection reads its first request line; when another process of the node
runs what it asks for (an operation's websocket, the events stream), it passes the socket itself
(SCM_RIGHTS) and the bytes read so far, in one message on a SOCK_SEQPACKET pair, and closes its own
copy: the other process serves the connection as if it had accepted it. Nothing is relayed, and the
client's credentials (SO_PEERCRED) stay those of the socket.
"""

from __future__ import annotations

import array
import asyncio
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable

from core.workers import MAX_WORKERS

log = logging.getLogger(__name__)
MAX_HANDED = 64 << 10  # bytes already read that may go with a connection (more: served where it landed)
STAY = 1  # flag: the receiver serves it whatever it asks for (a process that could not place it gave it back)
_FD = array.array("i", [0]).itemsize

# (the connection, the bytes read of it so far, the flags) -> None: the receiver now owns the socket
Adopt = Callable[[socket.socket, bytes, int], None]


def pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a handoff channel (each process keeps one: a message is one connection)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (a, b):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        end.setblocking(False)
    return a, b


def hand(channel: socket.socket, transport: asyncio.BaseTransport, data: bytes, flags: int = 0) -> bool:
    """Pass ``transport``'s connection and ``data`` (what was read of it) over ``channel``; True when sent
    (the transport is then aborted here, the connection lives on in the receiver)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not _send(channel, sock.fileno(), data, flags):
        return False
    transport.abort()  # our copy only: the receiver's fd keeps the connection open
    return True


def hand_socket(channel: socket.socket, sock: socket.socket, data: bytes, flags: int = 0) -> bool:
    """``hand`` for a connection no transport serves yet (one handed here that belongs elsewhere)."""
    if not _send(channel, sock.fileno(), data, flags):
        return False
    sock.close()
    return True


def _send(channel: socket.socket, fd: int, data: bytes, flags: int) -> bool:
    if len(data) > MAX_HANDED:
        return False
    try:
        channel.sendmsg([bytes([flags]) + data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    except OSError as exc:  # the receiver is gone or full: serve it here (slower, never lost)
        log.debug("handoff refused (%s): served where it landed", exc)
        return False
    return True


class Receiver:
    """Takes the connections another process hands over ``channel`` and gives each to ``adopt``."""

    def __init__(self, channel: socket.socket, adopt: Adopt, on_closed: Callable[[], None] = lambda: None) -> None:
        self.channel = channel
        self._adopt = adopt
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(channel.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):  # a burst, then the loop's other work
            try:
                msg, ancillary, _flags, _addr = self.channel.recvmsg(MAX_HANDED + 1, socket.CMSG_SPACE(4 * _FD),
                                                                     socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff channel: %s", exc)
                return self.close()
            fds = array.array("i")
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[: len(raw) - len(raw) % _FD])
            if not msg and not fds:  # the other end closed
                return self.close()
            if len(fds) != 1 or not msg:
                for fd in fds:
                    socket.close(fd)
                continue
            conn = socket.socket(fileno=fds[0])
            conn.setblocking(False)
            try:
                self._adopt(conn, msg[1:], msg[0])
            except Exception:  # one bad connection, not the channel
                log.exception("handoff: could not serve a handed connection")
                conn.close()

    def close(self) -> None:
        if self.channel.fileno() >= 0:
            self._loop.remove_reader(self.channel.fileno())
            self.channel.close()
            self._on_closed()


class Loads:
    """The work each process of the node has in hand (its live operations: least outstanding work wins,
    idle kept-alive connections weigh nothing): one slot per process in a memfd
    every process maps (the agent makes it and passes it to its workers), each writing only its own slot,
    read by all when a new connection decides where it goes (core/workers.py ``lighter``)."""

    _SLOT = struct.Struct("q")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("execbroker-loads", os.MFD_CLOEXEC)
            os.ftruncate(fd, MAX_WORKERS * self._SLOT.size)
        self.fd = fd
        self._map = mmap.mmap(fd, MAX_WORKERS * self._SLOT.size)

    def set(self, process: int, load: int) -> None:
        self._SLOT.pack_into(self._map, process * self._SLOT.size, load)

    def add(self, process: int, n: int) -> None:
        """A guess until ``process`` writes its own count again (a connection just handed to it)."""
        self.set(process, self.get(process) + n)

    def get(self, process: int) -> int:
        return int(self._SLOT.unpack_from(self._map, process * self._SLOT.size)[0])

    def all(self, processes: int) -> list[int]:
        return [self.get(i) for i in range(processes)]
