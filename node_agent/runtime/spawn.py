"""Agent side of the spawn protocol (see ``node_agent/runtime/pid1``): start a command inside an instance.

Fully non-blocking and thread-free: each ``Process`` is one SOCK_SEQPACKET connection to the instance's pid1
with one event-loop reader on it, so an agent can hold thousands of them.

File descriptors: ``spawn()`` sends *copies* of the caller's three fds to pid1 (SCM_RIGHTS) and never closes
the caller's fds; the caller closes its copies once ``spawn()`` returned or raised (for pipes: the ends the
command uses, so that EOF works). pid1 closes its copies right after forking. A PTY is opened by pid1,
inside the instance (its own devpts: no host path is looked up in the instance's root), and its master
comes back with the reply: ``Process.pty_master``, the caller's to close.

Bounds: the request is at most 4 MiB; pid1 must answer within ``REPLY_TIMEOUT`` seconds (a silent pid1
fails the spawn, the connection closed: nothing waits forever, nothing leaks).

Lifetime: the connection *is* the command's leash. ``Process.close()`` while the command runs makes pid1
SIGKILL the command's process group; after ``wait()`` returned, ``close()`` only releases the socket.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import aio
from core.errors import BadRequest, SpawnError
from node_agent.runtime.unixsock import connect_unix

# Exit code reported when pid1 vanished under a running command (instance stopped or killed): as SIGKILL.
EXIT_PID1_GONE = 137
SUN_PATH_MAX = 107
REQUEST_BUFFER = 4 << 20  # pid1 reads requests up to this size
REPLY_TIMEOUT = 10.0
REPLY_BUFFER = 64 << 10  # the largest answer taken from pid1 (a file's answer holds a 4 KiB path or two)
FD_SIZE = array.array("i").itemsize
MAX_ERROR = 2000  # characters of pid1's refusal passed on


class Pid1Unavailable(BadRequest):
    def __init__(self) -> None:
        super().__init__("Instance is not running")


@dataclass
class SpawnRequest:
    argv: list[str]
    env: dict[str, str]
    cwd: str = ""  # empty: $HOME from env if that directory exists, else /
    uid: int = 0
    gid: int = 0
    pty: bool = False  # run on a new PTY (pid1 opens it; no fds are sent); it becomes the controlling terminal
    width: int = 0
    height: int = 0

    def encode(self) -> bytes:
        return json.dumps({"argv": self.argv, "env": self.env, "cwd": self.cwd, "uid": self.uid,
                           "gid": self.gid, "pty": self.pty, "width": self.width, "height": self.height}).encode()


def exit_code(wait_status: int) -> int:
    """Exit N -> N; killed by signal S -> 128+S (the shell's and Incus' convention)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Process:
    """A command running inside an instance, as pid1 reported it. Create with ``spawn()``."""

    def __init__(self, pid: int, host_pid: int | None, sock: socket.socket, pty_master: int | None = None) -> None:
        self.pid = pid  # in the instance's pid namespace
        self.host_pid = host_pid  # in our own pid namespace; None if it could not be determined
        self.pty_master = pty_master  # the command's terminal (non-blocking), when it asked for one
        self._sock = sock
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._outbox: list[bytes] = []
        self._exited.get_loop().add_reader(sock.fileno(), self._on_readable)

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, host_pid={self.host_pid}, returncode={self.returncode})"

    async def wait(self) -> int:
        """Exit code: N for exit N, 128+S when killed by signal S, 137 if pid1 vanished."""
        return await asyncio.shield(self._exited)

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only. Ignored once it exited."""
        self._control({"signal": int(sig)})

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the command's whole process group. Ignored once it exited."""
        self._control({"signal": int(sig), "group": True})

    def kill_group(self) -> None:
        """SIGKILL the command's whole process group (background children too). Ignored once it exited."""
        self._control({"kill": True})

    def close(self) -> None:
        """Release the connection; if the command still runs, pid1 SIGKILLs its process group."""
        if self._sock.fileno() < 0:
            return
        loop = self._exited.get_loop()
        loop.remove_reader(self._sock.fileno())
        if self._outbox:
            loop.remove_writer(self._sock.fileno())
        self._sock.close()
        if not self._exited.done():
            self._exited.set_result(EXIT_PID1_GONE)

    def _control(self, msg: dict[str, Any]) -> None:
        if self._exited.done() or self._sock.fileno() < 0:
            return
        self._outbox.append(json.dumps(msg).encode())
        if len(self._outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        loop = self._exited.get_loop()
        while self._outbox:
            try:
                self._sock.send(self._outbox[0])
            except BlockingIOError:
                loop.add_writer(self._sock.fileno(), self._on_writable)
                return
            except OSError:  # pid1 closed the connection: the command is gone
                self._outbox.clear()
                return
            self._outbox.pop(0)

    def _on_writable(self) -> None:
        self._exited.get_loop().remove_writer(self._sock.fileno())
        self._flush()

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            try:
                code = exit_code(int(json.loads(data)["exit"]))
            except (ValueError, KeyError, TypeError):
                return  # not an exit report: nothing else is defined after the start reply
        else:
            code = EXIT_PID1_GONE
        if not self._exited.done():
            self._exited.set_result(code)
        self.close()


async def spawn(socket_path: Path, req: SpawnRequest, fds: tuple[int, ...]) -> Process:
    """Ask the pid1 listening at ``socket_path`` to run ``req`` with ``fds`` as its stdin/stdout/stderr
    (none for a PTY, which pid1 opens: ``Process.pty_master``).

    Raises ``SpawnError`` when the command could not be started (bad cwd, uid, ..., or no answer in time)
    and ``BadRequest("Instance is not running")`` when no pid1 answers.
    """
    if not req.argv:
        raise SpawnError("Missing command")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        await _connect(loop, sock, socket_path)
        payload = req.encode()
        if len(payload) > REQUEST_BUFFER:
            raise SpawnError("Command and environment are too large")
        if len(payload) > 200_000:  # default socket buffers hold ~200 KiB per message
            _grow_send_buffer(sock, len(payload) + 4096)
        await _send(loop, sock, payload, fds)
        try:
            reply, got = await aio.within(_recv(loop, sock), REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise SpawnError(f"The instance did not answer the spawn request within {REPLY_TIMEOUT:.0f} s") from None
        pid, pidfd, master = take_reply(reply, got, req.pty)
        try:
            host_pid = _pidfd_host_pid(pidfd) if pidfd is not None else None
        finally:
            if pidfd is not None:
                os.close(pidfd)
        if master is not None:
            os.set_blocking(master, False)
    except BaseException:
        sock.close()
        raise
    return Process(pid, host_pid, sock, master)


async def ask(socket_path: Path, payload: bytes, timeout: float = REPLY_TIMEOUT) -> tuple[bytes, list[int]]:
    """One request to pid1 on a connection of its own, and its one answer with the fds that came with it
    (the caller's to close). Raises ``Pid1Unavailable`` when no pid1 listens, ``SpawnError`` on silence."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
        await _connect(loop, sock, socket_path)
        await _send(loop, sock, payload, ())
        try:
            return await asyncio.wait_for(_recv(loop, sock), timeout)
        except asyncio.TimeoutError:
            raise SpawnError(f"The instance did not answer within {timeout:.0f} s") from None


def take_reply(reply: bytes, got: list[int], want_pty: bool) -> tuple[int, int | None, int | None]:
    """pid1's answer to a spawn: (pid inside, pidfd, PTY master). pid1 runs as the instance's root, so its
    answer is checked like any input: every fd that came with it is returned or closed, whatever it says."""
    try:
        if not reply:
            raise Pid1Unavailable()
        try:
            msg = json.loads(reply)
        except ValueError:
            raise SpawnError("Malformed answer from the instance's pid1") from None
        if not isinstance(msg, dict):
            raise SpawnError("Malformed answer from the instance's pid1")
        if "error" in msg:
            raise SpawnError(str(msg["error"])[:MAX_ERROR])
        names, pid = msg.get("fds", []), msg.get("pid")
        allowed = {"pidfd", "pty"} if want_pty else {"pidfd"}
        if (not isinstance(names, list) or len(names) != len(got) or len(set(map(str, names))) != len(names)
                or not set(map(str, names)) <= allowed or not isinstance(pid, int) or isinstance(pid, bool)
                or pid <= 0):
            raise SpawnError("Malformed answer from the instance's pid1")
        kept = dict(zip(names, got))
        if want_pty and "pty" not in kept:
            raise SpawnError("The instance's pid1 sent no terminal")
        return pid, kept.get("pidfd"), kept.get("pty")
    except BaseException:
        for fd in got:
            os.close(fd)
        raise


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, path: Path) -> None:
    dir_fd = -1
    address = str(path)
    if len(os.fsencode(address)) > SUN_PATH_MAX:  # too long for sun_path: go through a directory fd
        try:
            dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise Pid1Unavailable() from None
        address = f"/proc/self/fd/{dir_fd}/{path.name}"
    try:
        await connect_unix(sock, address)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        raise Pid1Unavailable() from None
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def _grow_send_buffer(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, 32, size)  # SO_SNDBUFFORCE (root), beyond wmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, payload: bytes,
                fds: tuple[int, ...]) -> None:
    while True:
        try:
            socket.send_fds(sock, [payload], list(fds))
            return
        except BlockingIOError:
            await _ready(loop, sock, write=True)
        except (BrokenPipeError, ConnectionResetError):
            raise Pid1Unavailable() from None
        except OSError as exc:
            raise SpawnError(f"Failed to send the command to the instance: {exc.strerror}") from None


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, list[int]]:
    while True:
        try:
            # not socket.recv_fds: it drops its flags argument, and the fds would come without close-on-exec
            data, ancdata, flags, _addr = sock.recvmsg(REPLY_BUFFER, socket.CMSG_SPACE(2 * FD_SIZE),
                                                       socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % FD_SIZE])
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                raise SpawnError("The instance's pid1 answered with too large a message")
            return data, list(fds)
        except BlockingIOError:
            await _ready(loop, sock, write=False)
        except ConnectionResetError:
            return b"", []


def _pidfd_host_pid(pidfd: int) -> int | None:
    """The pid, in our own pid namespace, of the process a pidfd refers to (pidfd fdinfo, Linux >= 5.3)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None  # 0: not visible from here; -1: already reaped
    except (OSError, ValueError, IndexError):
        pass
    return None


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)
