"""ExecSession: one per exec. It alone owns the command's process and its pipes or PTY, and relays
them to the exec websockets (spec §5). Everything else talks to it through ``connect`` (or ``attach``)
and ``cancel``.

Decisions (who may start, what a disconnect means) live in core/session_state.py; this module is the
asyncio adapter around them. Its sockets are ports (core/channel.Port) and its streams pumps
(node_agent/pumps.py): callbacks, not tasks, so that a session costs one task (its operation's run)
however many sockets it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios
from collections.abc import Awaitable, Callable

from core.channel import Channel, ChannelPort, Port
from core.errors import ApiError, SpawnError
from core.execspec import CONTROL, ExecPost, ExitResult, Resize, Signal, parse_control
from core.operations import Operation
from core.session_state import Phase, SessionState
from node_agent.asciicast import Recorder
from node_agent.deadline import Deadline, outcome
from node_agent.fdio import close_quietly, make_pipe, set_nonblocking, write_all
from node_agent.pumps import InputPump, OutputPump
from node_agent.runtime.spawn import Process, SpawnRequest

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CLIENT_CLOSE_GRACE = 2.0  # interactive: how long to wait for the client to close socket 0 after EOF

SpawnFn = Callable[[SpawnRequest, tuple[int, ...]], Awaitable[Process]]


def set_winsize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


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
        self._loop = asyncio.get_running_loop()
        self._ports: dict[str, Port] = {}
        self._released: dict[str, asyncio.Future[None]] = {}  # fd -> done with its socket
        self._ready: asyncio.Future[None] = self._loop.create_future()  # every required socket is in
        self._process: Process | None = None
        self._pty_master: int | None = None
        self._outputs: list[OutputPump] = []
        self._outputs_done: asyncio.Future[None] | None = None
        self._input: InputPump | None = None
        self._client_closed: asyncio.Future[None] = self._loop.create_future()  # interactive: socket 0 ended
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

    def connect(self, fd: str, channel: Channel | Port) -> asyncio.Future[None]:
        """Hand a claimed, connected socket to the session; the future is done when the session is
        done with it (it then closed it)."""
        port = as_port(channel)
        released = self._loop.create_future()
        if self.state.phase is Phase.CLOSED:
            port.shut()
            released.set_result(None)
            return released
        self._ports[fd] = port
        self._released[fd] = released
        if self.state.phase is not Phase.WAITING and fd == CONTROL and self._process is not None:
            port.listen(self._control)
        if self.state.ready and not self._ready.done():
            self._ready.set_result(None)
        return released

    async def attach(self, fd: str, channel: Channel) -> None:
        """``connect``, and return when the session is done with the socket."""
        await asyncio.shield(self.connect(fd, channel))

    # -- lifecycle ----------------------------------------------------------------------------------
    async def cancel(self) -> None:
        """DELETE of the operation: kill the command (its whole process group), or never start it."""
        self._cancelled = True
        if not self._ready.done():
            self._ready.set_result(None)
        if self._process is not None:
            self._process.kill_group()

    async def run(self, op: Operation) -> None:
        """The operation's run function: wait for sockets, run the command, relay, report."""
        try:
            if not self._ready.done():
                timer = self._loop.call_later(CONNECT_TIMEOUT, self._connect_timeout)
                try:
                    await self._ready
                finally:
                    timer.cancel()
            if self._cancelled:
                return
            result = self._result(await self._run_command())
            op.extend_metadata({"return": result.code})
            if result.error:
                raise ApiError(result.error)
        finally:
            self._shutdown()

    def _connect_timeout(self) -> None:
        if not self._ready.done():
            self._ready.set_exception(ApiError("Timed out waiting for websockets to connect"))

    async def _run_command(self) -> int:
        spawn_req = self._spawn_request()
        if self.req.interactive:  # pid1 opens the PTY inside the instance and hands us its master
            try:
                self._process = await self._spawn(spawn_req, ())
            except SpawnError as exc:
                raise ApiError(str(exc)) from None
            self._pty_master = self._process.pty_master
        else:
            in_r, in_w = make_pipe()
            set_nonblocking(in_w)  # the input pump waits for room: a blocking write would stop the loop
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
            self._relay_interactive(self._pty_master)
        else:
            self._relay_pipes(*mine)
        try:
            code = await self._process.wait()
        finally:
            self.state.phase = Phase.EXITED
            for pump in self._outputs:
                pump.exited()
        assert self._outputs_done is not None
        await self._outputs_done
        if self.req.interactive and not self._client_closed.done():
            timer = self._loop.call_later(CLIENT_CLOSE_GRACE, _settle, self._client_closed)
            try:
                await self._client_closed
            finally:
                timer.cancel()
        return code

    def _relay_pipes(self, stdin_w: int, stdout_r: int, stderr_r: int) -> None:
        p0, p1, p2 = self._ports["0"], self._ports["1"], self._ports["2"]
        self._watch_outputs((stdout_r, p1), (stderr_r, p2))
        self._input = InputPump(p0, stdin_w, self._took_input, owns_fd=True)
        p1.listen(self._stdout_socket)
        p2.listen(_ignore_message)
        if CONTROL in self._ports:
            self._ports[CONTROL].listen(self._control)

    def _relay_interactive(self, master: int) -> None:
        p0 = self._ports["0"]
        self._watch_outputs((master, p0))
        self._input = InputPump(p0, master, self._took_input, owns_fd=False,
                                on_end=lambda: _settle(self._client_closed))
        self._ports[CONTROL].listen(self._control)

    def _watch_outputs(self, *outputs: tuple[int, Port]) -> None:
        self._outputs_done = self._loop.create_future()
        left = [len(outputs)]

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                _settle(self._outputs_done)

        self._outputs = [OutputPump(fd, port, self._gave_output, one_done) for fd, port in outputs]

    # -- what the pumps and ports report -----------------------------------------------------------------
    def _gave_output(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._count_out(len(data))
        if self.recorder is not None:
            self.recorder.output(data)

    def _took_input(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._count_in(len(data))
        if self.recorder is not None:
            self.recorder.input(data)

    def _stdout_socket(self, _msg: bytes | str | None) -> None:
        """Socket 1 never carries client data: anything on it, or its loss, means the client went away."""
        port = self._ports["1"]
        port.listen(_ignore_message)
        if self.state.stdout_activity_kills() and self._process is not None:
            log.warning("stdout websocket activity without a control socket: killing the command")
            self._process.kill_group()

    def _control(self, msg: bytes | str | None) -> None:
        if msg is None:
            if self.state.control_lost_kills() and self._process is not None:
                log.warning("control websocket closed while the command runs: killing it")
                self._process.kill_group()
            return
        self._apply_control(msg, self.req.interactive)

    def _shutdown(self) -> None:
        """Kill what still runs, close our fds and every socket; never leaves a process behind."""
        self.state.phase = Phase.CLOSED
        if self.deadline is not None:
            self.deadline.cancel()
        if self.recorder is not None:
            self.recorder.close()
        if self._process is not None:
            if self._process.returncode is None:
                self._process.kill_group()
            self._process.close()
        for pump in self._outputs:  # no fd is closed under a registered reader or writer
            pump.stop()
            if pump.fd != self._pty_master:
                close_quietly(pump.fd)
        if self._input is not None:
            self._input.stop()
        if self._pty_master is not None:
            close_quietly(self._pty_master)
            self._pty_master = None
        for fd, port in list(self._ports.items()):
            port.shut()
            _settle(self._released[fd])
        _settle(self._outputs_done)
        _settle(self._client_closed)
        if not self._ready.done():
            self._ready.set_result(None)


def as_port(channel: Channel | Port) -> Port:
    """The channel itself when it is a port (an exec websocket), else a port over it."""
    return channel if hasattr(channel, "offer") else ChannelPort(channel)  # type: ignore[return-value]


def _settle(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _ignore_message(_msg: bytes | str | None) -> None:
    pass
