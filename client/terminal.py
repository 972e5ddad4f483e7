"""Local terminal plumbing for ``execbroker exec``: raw mode, sizes, fd streams and signal forwarding."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty
from collections.abc import AsyncIterator, Callable, Iterator

READ_SIZE = 1 << 16

# Signals forwarded to the remote command as `signal` control messages (as lxc/incus do). SIGHUP is handled
# apart; SIGSEGV is left alone on purpose: a Python-level handler for a real fault would spin forever.
FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT, signal.SIGTSTP, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT,
)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put terminal ``fd`` in raw mode; the saved attributes are restored however the block exits."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size(fd: int) -> tuple[int, int]:
    """(width, height) of terminal ``fd``, (0, 0) when it is not a terminal."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 0, 0
    return size.columns, size.lines


async def read_chunks(fd: int) -> AsyncIterator[bytes]:
    """Yield what ``fd`` delivers until EOF, without blocking the loop for pipes, sockets and terminals.

    The fd is not switched to O_NONBLOCK (its open file description may be shared with the caller's shell).
    Instead the read happens inside the readiness callback, the only moment the fd is known to be readable
    (a readiness flag consumed later can be stale, and a blocking read would then stall the whole loop).
    Regular files cannot be polled and are read directly (such reads do not block for long).
    """
    loop = asyncio.get_running_loop()
    while True:
        chunk: asyncio.Future[bytes] = loop.create_future()

        def on_readable(chunk: asyncio.Future[bytes] = chunk) -> None:
            loop.remove_reader(fd)
            try:
                chunk.set_result(os.read(fd, READ_SIZE))
            except OSError:  # e.g. EIO on a terminal that went away
                chunk.set_result(b"")

        try:
            loop.add_reader(fd, on_readable)
        except PermissionError:  # regular file or /dev/null: epoll refuses it
            while data := os.read(fd, READ_SIZE):
                yield data
            return
        try:
            data = await chunk
        finally:
            loop.remove_reader(fd)
        if not data:
            return
        yield data


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """A sink writing every byte to ``fd`` (blocking: a slow reader slows the session down, as it should).

    BrokenPipeError propagates: like any Unix filter (and lxc), the session ends once its reader is gone.
    """

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return write


def hup_target() -> int:
    """SIGHUP is forwarded as is while a controlling terminal exists, else as SIGTERM (the terminal is gone)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return signal.SIGTERM
    return signal.SIGHUP


@contextlib.contextmanager
def forward_signals(
    on_signal: Callable[[int], object], on_resize: Callable[[], object] | None = None
) -> Iterator[None]:
    """Route the forwarded signals (and SIGWINCH, if ``on_resize``) to callbacks for the block's duration."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    try:
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, on_signal, int(sig))
            installed.append(sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: on_signal(hup_target()))
        installed.append(signal.SIGHUP)
        if on_resize is not None:
            loop.add_signal_handler(signal.SIGWINCH, on_resize)
            installed.append(signal.SIGWINCH)
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
