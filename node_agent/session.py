"""ExecSession: one per exec. It alone owns the command's process and its pipes or PTY, and relays
them to the exec websockets (spec §5). Everything else talks to it through ``attach`` and ``cancel``.

Decisions (who may start, what a disconnect means) live in broker/session_state.py; this module is the
asyncio adapter around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios
from collections.abc import Awaitable, Callable

from core.channel import Channel, ChannelClosed
from core.errors import ApiError, SpawnError
from core.execspec import CONTROL, ExecPost, ExitResult, Resize, Signal, parse_control
from core.operations import Operation
from core.session_state import Phase, SessionState
from node_agent.asciicast import Recorder
from node_agent.deadline import Deadline, outcome
from node_agent.fdio import OutputReader, close_quietly, make_pipe, set_nonblocking, write_all
from node_agent.runtime.spawn import Process, SpawnRequest

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CLIENT_CLOSE_GRACE = 2.0  # interactive: how long to wait for the client to close socket 0 after EOF

SpawnFn = Callable[[SpawnRequest, tuple[int, ...]], Awaitable[Process]]


def set_winsize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


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
            if isinstance(data, str):
                await self.channel.send_text(data)
            else:
                await self.channel.send_bytes(data)
        except ChannelClosed:
            self.broken = True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()
        self.done.set()


def _ignore(_n: int) -> None:
    pass


class SessionIO:
    """What both session kinds do with client input and control messages: count, record, deliver."""

    req: ExecPost
    env: dict[str, str]
    bytes_in: int
    recorder: Recorder | None
    deadline: Deadline | None
    _count_in: Callable[[int], None]
    _pty_master: int | None
    _process: Process | None

    def _spawn_request(self) -> SpawnRequest:
        return SpawnRequest(argv=list(self.req.command), env=self.env, cwd=self.req.cwd or "",
                            uid=self.req.user or 0, gid=self.req.group or 0, pty=self.req.interactive,
                            width=self.req.width, height=self.req.height)

    def _result(self, code: int) -> ExitResult:
        return outcome(self.deadline, code)

    async def _feed(self, fd: int, data: bytes) -> bool:
        """Client input to the command; False when the command closed its end (the rest is dropped)."""
        self.bytes_in += len(data)
        self._count_in(len(data))
        if self.recorder is not None:
            self.recorder.input(data)
        try:
            await write_all(fd, data)
        except OSError:
            return False
        return True

    def _apply_control(self, msg: bytes | str, interactive: bool) -> None:
        action = parse_control(msg, interactive)
        if isinstance(action, Resize) and self._pty_master is not None:
            with contextlib.suppress(OSError):
                set_winsize(self._pty_master, action.width, action.height)
            if self.recorder is not None:
                self.recorder.resize(action.width, action.height)
        elif isinstance(action, Signal) and self._process is not None:
            self._process.signal(action.signum)


class ExecSession(SessionIO):
    def __init__(self, req: ExecPost, env: dict[str, str], spawn: SpawnFn,
                 on_started: Callable[[], None] | None = None, count_in: Callable[[int], None] = _ignore,
                 count_out: Callable[[int], None] = _ignore) -> None:
        self.req = req
        self._count_in = count_in  # bytes relayed to the command, and from it (metrics)
        self._count_out = count_out
        self.bytes_in = self.bytes_out = 0  # this session's (audit)
        self.env = env
        self.state = SessionState(req.interactive)
        self._spawn = spawn
        self._on_started = on_started
        self._sockets: dict[str, _Socket] = {}
        self._ready = asyncio.Event()
        self._exited = asyncio.Event()
        self._process: Process | None = None
        self._pty_master: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cancelled = False
        self.deadline: Deadline | None = None  # of a command run with a timeout
        self.recorder: Recorder | None = None  # of a session recorded as asciicast

    # -- operation metadata -------------------------------------------------------------------------
    def metadata(self) -> dict[str, object]:
        return {
            "command": self.req.command,
            "environment": self.env,
            "interactive": self.req.interactive,
            "fds": dict(self.state.secrets),
        }

    # -- websockets ---------------------------------------------------------------------------------
    def claim(self, secret: str) -> str:
        return self.state.claim(secret)

    def release(self, fd: str) -> None:
        self.state.release(fd)

    async def attach(self, fd: str, channel: Channel) -> None:
        """Hand a connected websocket to the session; returns when the session is done with it."""
        sock = _Socket(channel)
        self._sockets[fd] = sock
        if self.state.phase is not Phase.WAITING and fd == CONTROL and self._process is not None:
            self._spawn_task(self._control_loop(sock))
        if self.state.ready:
            self._ready.set()
        await sock.done.wait()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def cancel(self) -> None:
        """DELETE of the operation: kill the command (its whole process group), or never start it."""
        self._cancelled = True
        self._ready.set()
        if self._process is not None:
            self._process.kill_group()

    async def run(self, op: Operation) -> None:
        """The operation's run function: wait for sockets, run the command, relay, report."""
        try:
            try:
                await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT)
            except asyncio.TimeoutError:
                raise ApiError("Timed out waiting for websockets to connect") from None
            if self._cancelled:
                return
            result = self._result(await self._run_command())
            op.extend_metadata({"return": result.code})
            if result.error:
                raise ApiError(result.error)
        finally:
            await self._shutdown()

    async def _run_command(self) -> int:
        spawn_req = self._spawn_request()
        if self.req.interactive:  # pid1 opens the PTY inside the instance and hands us its master
            try:
                self._process = await self._spawn(spawn_req, ())
            except SpawnError as exc:
                raise ApiError(str(exc)) from None
            self._pty_master = self._process.pty_master
            mine: tuple[int, ...] = ()
        else:
            in_r, in_w = make_pipe()
            set_nonblocking(in_w)  # write_all waits for room: a blocking write would stop the loop
            out_r, out_w = make_pipe()
            err_r, err_w = make_pipe()
            mine = (in_w, out_r, err_r)
            try:
                self._process = await self._spawn(spawn_req, (in_r, out_w, err_w))
            except SpawnError as exc:
                close_quietly(*mine)
                raise ApiError(str(exc)) from None
            except BaseException:
                close_quietly(*mine)
                raise
            finally:
                close_quietly(in_r, out_w, err_w)
        self.state.phase = Phase.RUNNING
        if self.req.timeout is not None:
            self.deadline = Deadline(self._process, self.req.timeout)
        if self._cancelled:  # DELETE arrived while the spawn was in flight
            self._process.kill_group()
        if self._on_started is not None:
            self._on_started()
        if self.req.interactive:
            assert self._pty_master is not None
            return await self._relay_interactive(self._pty_master)
        return await self._relay_pipes(*mine)

    async def _relay_pipes(self, stdin_w: int, stdout_r: int, stderr_r: int) -> int:
        proc = self._process
        assert proc is not None
        s0, s1, s2 = self._sockets["0"], self._sockets["1"], self._sockets["2"]
        outputs = [
            self._spawn_task(self._pump_out(OutputReader(stdout_r, self._exited), s1)),
            self._spawn_task(self._pump_out(OutputReader(stderr_r, self._exited), s2)),
        ]
        self._spawn_task(self._pump_in(s0, stdin_w))
        self._spawn_task(self._watch_stdout(s1))
        self._spawn_task(self._drain(s2))
        if CONTROL in self._sockets:
            self._spawn_task(self._control_loop(self._sockets[CONTROL]))
        try:
            try:
                code = await proc.wait()
            finally:
                self._mark_exited()
            await asyncio.gather(*outputs)
            return code
        finally:  # cancelled mid-command too: the readers stop before their fds close
            for task in outputs:
                task.cancel()
            await asyncio.gather(*outputs, return_exceptions=True)
            close_quietly(stdout_r, stderr_r)

    async def _relay_interactive(self, master: int) -> int:
        proc = self._process
        assert proc is not None
        s0 = self._sockets["0"]
        output = self._spawn_task(self._pump_out(OutputReader(master, self._exited), s0))
        client_closed = asyncio.Event()
        self._spawn_task(self._pump_in(s0, master, close_after=False, closed=client_closed))
        self._spawn_task(self._control_loop(self._sockets[CONTROL]))
        try:
            code = await proc.wait()
        finally:
            self._mark_exited()
        await output
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client_closed.wait(), CLIENT_CLOSE_GRACE)
        return code

    def _mark_exited(self) -> None:
        self.state.phase = Phase.EXITED
        self._exited.set()

    # -- pumps --------------------------------------------------------------------------------------
    async def _pump_out(self, reader: OutputReader, sock: _Socket) -> None:
        while data := await reader.read():
            self.bytes_out += len(data)
            self._count_out(len(data))
            if self.recorder is not None:
                self.recorder.output(data)
            await sock.send(data)
        await sock.send("")

    async def _pump_in(self, sock: _Socket, fd: int, close_after: bool = True,
                       closed: asyncio.Event | None = None) -> None:
        forwarding = True
        try:
            while True:
                msg = await sock.channel.receive()
                if msg is None:
                    break
                if isinstance(msg, str):
                    forwarding = False  # EOF barrier: stop forwarding, keep reading for pings/close
                    if close_after:
                        close_quietly(fd)
                        close_after = False
                    continue
                if forwarding:
                    forwarding = await self._feed(fd, msg)
        finally:
            if close_after:
                close_quietly(fd)
            if closed is not None:
                closed.set()

    async def _watch_stdout(self, sock: _Socket) -> None:
        """Socket 1 never carries client data: anything on it, or its loss, means the client went away."""
        await sock.channel.receive()
        if self.state.stdout_activity_kills() and self._process is not None:
            log.warning("stdout websocket activity without a control socket: killing the command")
            self._process.kill_group()
        await self._drain(sock)

    async def _drain(self, sock: _Socket) -> None:
        while await sock.channel.receive() is not None:
            pass

    async def _control_loop(self, sock: _Socket) -> None:
        proc = self._process
        assert proc is not None
        while True:
            msg = await sock.channel.receive()
            if msg is None:
                if self.state.control_lost_kills():
                    log.warning("control websocket closed while the command runs: killing it")
                    proc.kill_group()
                return
            self._apply_control(msg, self.req.interactive)

    def _spawn_task(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    async def _shutdown(self) -> None:
        """Kill what still runs, close our fds and every socket; never leaves a process behind."""
        self.state.phase = Phase.CLOSED
        if self.deadline is not None:
            self.deadline.cancel()
        if self.recorder is not None:
            self.recorder.close()
        if self._process is not None:
            if not self._exited.is_set():
                self._process.kill_group()
            self._process.close()
        if self._pty_master is not None:
            close_quietly(self._pty_master)
            self._pty_master = None
        for sock in list(self._sockets.values()):
            await sock.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._ready.set()
