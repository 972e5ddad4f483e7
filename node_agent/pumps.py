"""Bytes between a command's fds and an exec session's ports (core/channel.Port), on event-loop
callbacks: no task per stream, so an idle session is a few objects and registered fds.

Backpressure both ways: output is read only while its port takes more (a slow client pauses the
command, memory stays bounded); a port's input is read only while the command's input takes it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
from collections.abc import Callable

from core.channel import Port
from node_agent.fdio import EXIT_GRACE, close_quietly, readable_bytes

log = logging.getLogger(__name__)


class OutputPump:
    """A command's stdout, stderr or PTY master to a port, then the barrier (spec §5.8): while the
    command runs, one read per readiness of what is buffered; once it exited, what is readable now,
    a read that finds nothing being the end (background children may keep the pipe open), and no more
    than ``EXIT_GRACE`` seconds of it."""

    def __init__(self, fd: int, port: Port, on_data: Callable[[bytes], None], on_done: Callable[[], None]) -> None:
        self.fd = fd
        self.port = port
        self._on_data = on_data
        self._on_done = on_done
        self._loop = asyncio.get_running_loop()
        self._exit_at: float | None = None
        self._reading = False
        self.done = False
        os.set_blocking(fd, False)
        self._watch()

    def exited(self) -> None:
        """The command has ended: drain what is readable now, then end."""
        if self._exit_at is None:
            self._exit_at = self._loop.time()
            if self._reading:
                self._readable()

    def stop(self) -> None:
        """Read no more (the fd stays the caller's to close)."""
        self.done = True
        self._unwatch()

    def _watch(self) -> None:
        if not self._reading and not self.done:
            self._loop.add_reader(self.fd, self._readable)
            self._reading = True

    def _unwatch(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _readable(self) -> None:
        while not self.done:
            try:
                data = os.read(self.fd, readable_bytes(self.fd))
            except BlockingIOError:
                if self._exit_at is not None:
                    self._finish()
                return
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: a PTY whose every slave closed, its usual end
                    log.warning("exec output fd %d: %s", self.fd, exc)
                data = b""
            if not data:
                self._finish()
                return
            self._on_data(data)
            if not self.port.offer(data):
                self._unwatch()
                self.port.when_drained(self._drained)
                return
            if self._exit_at is None:
                return  # running: the next readiness brings the next read
            if self._loop.time() - self._exit_at > EXIT_GRACE:
                self._finish()
                return

    def _drained(self) -> None:
        if self.done:
            return
        self._watch()
        if self._exit_at is not None:  # no readiness may come for an empty pipe a child keeps open
            self._readable()

    def _finish(self) -> None:
        if not self.done:
            self.stop()
            self.port.offer("")
            self._on_done()


class InputPump:
    """A port's messages to a command's stdin pipe or PTY master: binary messages are written in order
    (the port paused while the fd is full), a text message is the end of input, after which messages are
    read and dropped. ``owns_fd``: the fd is closed at the end of input (a pipe: the command sees EOF)."""

    def __init__(self, port: Port, fd: int, on_data: Callable[[bytes], None], owns_fd: bool,
                 on_end: Callable[[], None] | None = None) -> None:
        self.port = port
        self.fd: int | None = fd
        self._on_data = on_data
        self._owns_fd = owns_fd
        self._on_end = on_end
        self._loop = asyncio.get_running_loop()
        self._pending: collections.deque[memoryview] = collections.deque()
        self._waiting = False  # for room in the fd
        self._forwarding = True
        self._eof = False
        port.listen(self._message)

    def stop(self) -> None:
        """Write no more; the fd is closed if it is ours."""
        self._forwarding = False
        self._pending.clear()
        self._unwait()
        self._close()

    def _message(self, msg: bytes | str | None) -> None:
        if msg is None:
            self._eof = True
            self._maybe_close()
            if self._on_end is not None:
                callback, self._on_end = self._on_end, None
                callback()
            return
        if isinstance(msg, str):
            self._eof = True
            self._maybe_close()
            return
        if not self._forwarding or self._eof or self.fd is None:
            return
        self._on_data(msg)
        self._pending.append(memoryview(msg))
        if not self._waiting:
            self._write()

    def _write(self) -> None:
        while self._pending and self.fd is not None:
            view = self._pending[0]
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                if not self._waiting:
                    self._waiting = True
                    self._loop.add_writer(self.fd, self._write)
                    self.port.pause()
                return
            except OSError:  # the command closed its input: the rest is dropped
                self._forwarding = False
                self._pending.clear()
                break
            if n == len(view):
                self._pending.popleft()
            else:
                self._pending[0] = view[n:]
        self._unwait()
        self._maybe_close()

    def _unwait(self) -> None:
        if self._waiting:
            self._waiting = False
            if self.fd is not None:
                self._loop.remove_writer(self.fd)
            self.port.resume()

    def _maybe_close(self) -> None:
        if self._eof and not self._pending:
            self._close()

    def _close(self) -> None:
        if self._owns_fd and self.fd is not None:
            fd, self.fd = self.fd, None
            if self._waiting:
                self._loop.remove_writer(fd)
                self._waiting = False
            close_quietly(fd)
