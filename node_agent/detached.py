"""DetachedSession: an exec that outlives its clients (extension ``exec_detach``, ``"detachable": true``).

The command starts at once, whether or not a client is attached, and keeps running when every socket
is gone. Each output stream (stdout and stderr; the terminal when interactive) goes into a bounded
``ReplayBuffer``; every attached output socket has its own reader at its own offset, so a client that
comes back (the same requestor, through any member) asks for ``?offset=N`` and gets what followed byte N,
then the live output. Backpressure: while a client reads a stream the command waits for it (nothing it
has not read is dropped); with nobody attached the oldest bytes go. Stdin and control attach and detach
the same way: losing them kills nothing, and stdin ends only with the client's EOF barrier. After the
command ended, the output sockets can still be read until the operation expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from core import aio
from core.aio import first_of
from core.channel import Channel, ChannelClosed, send
from core.errors import ApiError, BadRequest, Forbidden, SpawnError
from core.execspec import (
    CONTROL,
    ExecPost,
    find_socket,
)
from core.operations import Operation
from core.replay import ReplayBuffer, capacity_of
from core.session_state import SessionState
from node_agent.asciicast import Recorder
from node_agent.deadline import Deadline
from node_agent.fdio import (
    CHUNK,
    OutputReader,
    close_quietly,
    make_pipe,
    set_nonblocking,
    write_fully,
)
from node_agent.runtime.spawn import Process
from node_agent.session import SessionIO, SpawnFn, _ignore

log = logging.getLogger(__name__)

DELIVERY_GRACE = 5.0  # after the command ended: how long attached clients get to read what is left


class _Socket:
    """An attached websocket: its channel and the event its route handler waits on."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.done = asyncio.Event()
        self.broken = False

    async def send(self, data: bytes | str) -> None:
        if self.broken:
            return
        try:
            await send(self.channel, data)
        except ChannelClosed:
            self.broken = True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()
        self.done.set()


class DetachedSession(SessionIO):
    detachable = True

    def __init__(self, req: ExecPost, env: dict[str, str], spawn: SpawnFn,
                 on_started: Callable[[], None] | None = None, count_in: Callable[[int], None] = _ignore,
                 count_out: Callable[[int], None] = _ignore) -> None:
        self.req = req
        self.env = env
        self.state = SessionState(req.interactive)  # the secrets; attachments are tracked here
        capacity = capacity_of(req.buffer_size)
        self.streams = {s: ReplayBuffer(capacity) for s in (("0",) if req.interactive else ("1", "2"))}
        self.live: dict[str, Any] = {"streams": {s: b.status() for s, b in self.streams.items()}, "attached": []}
        self.bytes_in = self.bytes_out = 0
        self.deadline: Deadline | None = None
        self.recorder: Recorder | None = None
        self.outputs: dict[str, int] = {}  # stream -> its record-output file, when asked for
        self.ended = False  # the command exited and its output was read to the end
        self._spawn = spawn
        self._on_started = on_started
        self._count_in = count_in
        self._count_out = count_out
        self._claims: dict[str, int | None] = {}  # fd -> offset, between claim and attach
        self._sockets: dict[str, _Socket] = {}
        self._offsets: dict[_Socket, tuple[str, int]] = {}  # attached output socket -> (stream, its offset)
        self._process: Process | None = None
        self._pty_master: int | None = None
        self._stdin_w: int | None = None
        self._exited = asyncio.Event()
        self._started = asyncio.Event()  # the command has its input (or will never have it)
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._cancelled = False

    # -- operation metadata -------------------------------------------------------------------------
    def metadata(self) -> dict[str, object]:
        return {"command": self.req.command, "environment": self.env, "interactive": self.req.interactive,
                "fds": dict(self.state.secrets), "detachable": True, "detach": self.live}

    def _stream_of(self, fd: str) -> str | None:
        if self.req.interactive:
            return "0" if fd == "0" else None
        return fd if fd in ("1", "2") else None

    # -- websockets ---------------------------------------------------------------------------------
    def claim(self, secret: str, offset: int | None = None) -> str:
        if not secret:
            raise ApiError("missing secret", 500)
        fd = find_socket(self.state.secrets, secret)
        if fd is None:
            raise Forbidden("Forbidden")
        if fd in self._claims:
            raise ApiError("Websocket number already connected", 409)
        old = self._sockets.get(fd)
        if old is not None:  # the same requestor again: its earlier connection is taken to be dead
            old.broken = True
            self._tasks.append(asyncio.ensure_future(old.close()))
        stream = self._stream_of(fd)
        if stream is None:
            if offset is not None:
                raise BadRequest("offset applies to output sockets only")
            if self.ended:
                raise ApiError("The command has ended: only its output can be read", 400)
        else:
            buf = self.streams[stream]
            offset = buf.earliest if offset is None else offset
            buf.check(offset)
        self._claims[fd] = offset
        return fd

    def release(self, fd: str) -> None:
        self._claims.pop(fd, None)

    def connect(self, fd: str, channel: Channel) -> asyncio.Future[None]:
        """``attach`` as a task: done when the socket is."""
        return aio.start(self.attach(fd, channel))

    async def attach(self, fd: str, channel: Channel) -> None:
        """Serve one attached websocket until its client goes (or the session is done with it)."""
        sock = _Socket(channel)
        offset = self._claims.pop(fd, None)
        self._sockets[fd] = sock
        self._live_changed()
        try:
            stream = self._stream_of(fd)
            if stream is not None:
                assert offset is not None
                self._offsets[sock] = (stream, offset)
                await first_of(self._send_from(stream, sock, offset),
                               self._take_input(sock) if self.req.interactive else self._drain(sock))
            elif fd == CONTROL:
                await self._control(sock)
            else:
                await self._take_input(sock)  # stdin of a non-interactive command
        finally:
            if self._sockets.get(fd) is sock:
                del self._sockets[fd]
            self._offsets.pop(sock, None)
            self._live_changed()
            self._notify()  # a reader waiting for this client need not wait any more
            await sock.close()
            sock.done.set()

    async def _send_from(self, stream: str, sock: _Socket, offset: int) -> None:
        buf = self.streams[stream]
        while not sock.broken:
            data = buf.read(offset, CHUNK)
            if data:
                await sock.send(data)
                offset += len(data)
                self._offsets[sock] = (stream, offset)
                self._notify()
            elif buf.closed:
                await sock.send("")  # the barrier: everything was delivered
                return
            else:
                await self._wait_change()

    async def _take_input(self, sock: _Socket) -> None:
        """Client input to the command (stdin pipe, or the terminal); a text frame is EOF on a pipe."""
        await self._started.wait()  # what arrives before the command has its input is kept in the socket
        while (msg := await sock.channel.receive()) is not None:
            target = self._pty_master if self.req.interactive else self._stdin_w
            if isinstance(msg, str):
                if not self.req.interactive and self._stdin_w is not None:
                    close_quietly(self._stdin_w)
                    self._stdin_w = None
                continue
            if target is not None:
                await self._feed(target, msg)

    async def _drain(self, sock: _Socket) -> None:
        while await sock.channel.receive() is not None:
            pass

    async def _control(self, sock: _Socket) -> None:
        await self._started.wait()
        while (msg := await sock.channel.receive()) is not None:
            if not self._exited.is_set():
                self._apply_control(msg, self.req.interactive)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def cancel(self) -> None:
        self._cancelled = True
        if self._process is not None:
            self._process.kill_group()

    async def run(self, op: Operation) -> None:
        try:
            if self._cancelled:
                return
            result = self._result(await self._run_command())
            await self._deliver()
            op.extend_metadata({"return": result.code})
            if result.error:
                raise ApiError(result.error)
        finally:
            await self._shutdown()

    async def _run_command(self) -> int:
        req = self._spawn_request()
        if self.req.interactive:
            try:
                self._process = await self._spawn(req, ())
            except SpawnError as exc:
                raise ApiError(str(exc)) from None
            self._pty_master = self._process.pty_master
            outputs = {"0": self._pty_master}
        else:
            in_r, self._stdin_w = make_pipe()
            set_nonblocking(self._stdin_w)  # write_all waits for room: a blocking write would stop the loop
            out_r, out_w = make_pipe()
            err_r, err_w = make_pipe()
            try:
                self._process = await self._spawn(req, (in_r, out_w, err_w))
            except BaseException as exc:
                close_quietly(out_r, err_r)
                if isinstance(exc, SpawnError):
                    raise ApiError(str(exc)) from None
                raise
            finally:
                close_quietly(in_r, out_w, err_w)
            outputs = {"1": out_r, "2": err_r}
        self._started.set()
        if self.req.timeout is not None:
            self.deadline = Deadline(self._process, self.req.timeout)
        if self._cancelled:
            self._process.kill_group()
        if self._on_started is not None:
            self._on_started()
        readers = [asyncio.ensure_future(self._read(stream, fd)) for stream, fd in outputs.items()]
        try:
            try:
                code = await self._process.wait()
            finally:
                self._exited.set()
            await asyncio.gather(*readers)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if not self.req.interactive:
                close_quietly(*outputs.values())
        return code

    async def _read(self, stream: str, fd: int) -> None:
        """The command's output into its buffer, waiting while an attached client is a full buffer behind."""
        buf = self.streams[stream]
        reader = OutputReader(fd, self._exited)
        try:
            while True:
                room = self._room(stream, buf)
                if room <= 0:
                    await self._wait_change()
                    continue
                data = await reader.read(room)
                if not data:
                    break
                buf.append(data)
                self.bytes_out += len(data)
                self._count_out(len(data))
                if self.recorder is not None:
                    self.recorder.output(data)
                if stream in self.outputs:
                    self._record_output(stream, data)
                self.live["streams"][stream] = buf.status()
                self._notify()
        finally:
            buf.closed = True
            self.live["streams"][stream] = buf.status()
            self._notify()

    def _record_output(self, stream: str, data: bytes) -> None:
        """The whole stream into its exec-output file (page-cache writes; on a write error, e.g. a full
        disk, the file stops there and the session goes on)."""
        try:
            write_fully(self.outputs[stream], data)
        except OSError as exc:
            log.warning("exec output of stream %s stopped: %s", stream, exc)
            close_quietly(self.outputs.pop(stream))

    def _room(self, stream: str, buf: ReplayBuffer) -> int:
        """How much may be read without dropping what an attached client has not read yet."""
        behind = [buf.produced - off for of, off in self._offsets.values() if of == stream]
        behind += [buf.produced - off for fd, off in self._claims.items()  # upgrading: held for them too
                   if off is not None and self._stream_of(fd) == stream]
        return buf.capacity - max(behind) if behind else CHUNK

    async def _deliver(self) -> None:
        """Give attached output sockets a moment to send what is left (they send the barrier at the end)."""
        deadline = asyncio.get_running_loop().time() + DELIVERY_GRACE
        while self._offsets and asyncio.get_running_loop().time() < deadline:
            pending = [sock for sock, (stream, off) in self._offsets.items() if off < self.streams[stream].produced]
            if not pending:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wait_change(), max(0.0, deadline - asyncio.get_running_loop().time()))

    async def _shutdown(self) -> None:
        """The command is over: kill what is left of it, close its input and terminal; the buffers stay
        readable (output sockets only) until the operation expires."""
        self.ended = True
        self._started.set()
        for buf in self.streams.values():
            buf.closed = True
        self._notify()
        if self.deadline is not None:
            self.deadline.cancel()
        if self._process is not None:
            if not self._exited.is_set():
                self._process.kill_group()
            self._process.close()
        close_quietly(self._pty_master, self._stdin_w)
        self._pty_master = self._stdin_w = None
        if self.recorder is not None:
            self.recorder.close()
        close_quietly(*self.outputs.values())
        self.outputs.clear()
        for fd, sock in list(self._sockets.items()):
            if self._stream_of(fd) is None:  # input and control: nothing more to do
                await sock.close()

    # -- change notification ------------------------------------------------------------------------
    def _notify(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def _wait_change(self) -> None:
        await asyncio.shield(self._changed)

    def _live_changed(self) -> None:
        self.live["attached"] = sorted(self._sockets)
