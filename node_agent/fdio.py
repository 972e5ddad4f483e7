"""Non-blocking pipe and PTY IO on the event loop, with backpressure: nothing is read from a process
until the previous chunk has been handed on, so a slow consumer pauses the command, never grows memory."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import termios
import time

CHUNK = 1 << 20  # one read, one frame (pipes are enlarged to this size, so a read drains a full buffer)
PIPE_SIZE = 1 << 20
EXIT_GRACE = 1.0  # keep reading at most this long after the command exits (background children)


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def make_pipe(big: bool = True) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    if big:
        try:
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        except OSError:
            pass  # limited by /proc/sys/fs/pipe-max-size: the default size still works
    return r, w


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writable: bool,
                   also: asyncio.Event | None = None) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, ready)
    waiter = None
    if also is not None:
        waiter = loop.create_task(also.wait())
        waiter.add_done_callback(lambda _t: ready())
    try:
        await fut
    finally:
        remove(fd)
        if waiter is not None:
            waiter.cancel()


_INT = struct.Struct("i")


def readable_bytes(fd: int) -> int:
    """How much to read: what is buffered (FIONREAD), at most CHUNK, so no 1 MiB buffer is allocated
    (and shrunk) for a few bytes; 1 when nothing is buffered (the read then tells EOF from EAGAIN)."""
    try:
        n = _INT.unpack(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return CHUNK
    return min(max(n, 1), CHUNK)


class OutputReader:
    """Reads a command's stdout/stderr or PTY master until EOF, following spec §5.8: after the command
    exits, keep draining what is readable; a read that finds nothing means EOF; stop after EXIT_GRACE
    even if background children keep writing."""

    def __init__(self, fd: int, exited: asyncio.Event) -> None:
        self.fd = fd
        self._exited = exited
        self._exit_at: float | None = None
        set_nonblocking(fd)

    async def read(self, limit: int = CHUNK) -> bytes:
        """The next bytes (at most ``limit``), b"" at EOF."""
        loop = asyncio.get_running_loop()
        while True:
            if self._exited.is_set() and self._exit_at is None:
                self._exit_at = time.monotonic()
            try:
                data = os.read(self.fd, min(readable_bytes(self.fd), limit))
            except BlockingIOError:
                if self._exit_at is not None:
                    return b""
                await _wait_fd(loop, self.fd, writable=False, also=self._exited)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # PTY: every slave closed
                    return b""
                raise
            if self._exit_at is not None and time.monotonic() - self._exit_at > EXIT_GRACE:
                return b""
            return data


def write_fully(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write everything to a blocking fd (a regular file): os.write may take only part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything to a non-blocking fd, waiting for room; raises BrokenPipeError when the reader has gone."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(loop, fd, writable=True)
            continue
        view = view[n:]


def close_quietly(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
