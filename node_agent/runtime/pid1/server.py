"""pid1 proper: PID 1 of the instance. One single-threaded select loop serves spawn connections,
reaps every child (commands and the orphans the namespace hands it) and ends the instance on SIGTERM."""

from __future__ import annotations

import array
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

from node_agent.runtime.pid1 import files
from node_agent.runtime.pid1.reclaim import Reclaimer
from node_agent.runtime.pid1.spawner import PosixSpawn, Request, exec_child, open_pty, write_all
from node_agent.runtime.pid1.syscalls import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    kill_quietly,
    peer_pid,
    prctl,
    reset_signals,
)

SOCKET_NAME = "spawn.sock"
READY = b"ready"
MAX_ERROR = 2000  # characters of an error text sent back
ID_RANGE = 65536  # ids a container maps (runtime/idranges.PER_INSTANCE)
MAX_REQUEST = 4 << 20  # argv + env of one exec; the kernel's own limit is about 2 MiB
FDS_SPACE = socket.CMSG_SPACE(3 * struct.calcsize("i"))


# ------------------------------------------------------------------------------------------------- pid1


class _Exec:
    """One spawn connection and the command it started."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn: socket.socket | None = conn
        self.pid = 0
        self.status_r = -1  # fork path: the child's status pipe until exec (EOF) or failure (text)
        self.status = b""
        self.started = False  # reply sent (exec succeeded)
        self.reaped: int | None = None  # wait status, once reaped
        self.pty_master = -1  # a PTY this pid1 opened for the command: goes to the agent with the reply


class Pid1:
    """``isolated``: PID 1 of its own pid namespace (a container), where signalling everything (-1) is
    safe and a dead parent takes its children along; else (the process driver) an ordinary process."""

    def __init__(self, isolated: bool, ready_fd: int) -> None:
        self.isolated = isolated
        self.ready_fd = ready_fd
        self.sel = selectors.DefaultSelector()
        self.by_pid: dict[int, _Exec] = {}
        self.by_conn: dict[socket.socket, _Exec] = {}
        self.stopping = False
        self.max_fd = os.sysconf("SC_OPEN_MAX")
        self.buffer = bytearray(MAX_REQUEST)
        self.spawner = PosixSpawn()
        self.reclaimer = Reclaimer(isolated)
        # unprivileged process driver: "root" is the agent's own user, files keep its ids
        self.file_root = files.ContainerRoot(chown=isolated or os.getuid() == 0,
                                             max_id=ID_RANGE - 1 if isolated else (1 << 32) - 2)

    # ---- setup

    def serve_container(self, listener: socket.socket) -> NoReturn:
        """Inside the container runc made (namespaces, pivot_root, hostname, mounts done): serve on the
        listening socket runc passed in. Not dumpable: nothing inside may open this process's /proc
        files (fds, memory, map_files) or ptrace it, whatever its uid there."""
        prctl(PR_SET_DUMPABLE, 0)
        try:
            os.setsid()
        except OSError:
            pass  # already a session leader
        self.listener = listener
        self.listener.setblocking(False)
        self._serve()

    def serve_process(self, instance_dir: str, log_path: str) -> NoReturn:
        """The process driver (development only): an ordinary process on the host, binding its socket."""
        os.setsid()  # own session: nothing aimed at the launcher's group reaches pid1
        devnull = os.open("/dev/null", os.O_RDWR)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        self.listener = self._listen(instance_dir)
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, as they would to a PID 1
        self._serve()

    def _serve(self) -> NoReturn:
        os.chdir("/")
        self._install_signals()
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        write_all(self.ready_fd, READY)
        os.close(self.ready_fd)
        self._loop()

    def _listen(self, instance_dir: str) -> socket.socket:
        # Bound by a relative name: the absolute path may exceed sun_path's 108 bytes.
        os.chdir(instance_dir)
        try:
            os.unlink(SOCKET_NAME)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
            sock.bind(SOCKET_NAME)
        finally:
            os.umask(old)
        sock.listen(socket.SOMAXCONN)  # a burst of execs queues here (the kernel caps it at somaxconn)
        return sock

    def _install_signals(self) -> None:
        reset_signals()
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a vanished agent must give EPIPE, not kill us
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)  # the work happens in _on_signal
        self.sel.register(wake_r, selectors.EVENT_READ, self._on_signal)

    # ---- main loop

    def _loop(self) -> NoReturn:
        while True:
            for key, _mask in self.sel.select():
                try:
                    key.data(key.fileobj)
                except Exception as exc:  # noqa: BLE001 - pid1 dying would take the whole instance down
                    print(f"pid1: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _on_signal(self, fd: int) -> None:
        try:
            signums = os.read(fd, 4096)
        except BlockingIOError:
            return
        if signal.SIGTERM in signums:
            self._begin_stop()
        self._reap()

    def _begin_stop(self) -> None:
        self.stopping = True
        if self.isolated:
            try:
                os.kill(-1, signal.SIGTERM)  # as PID 1: every other process of the namespace
            except ProcessLookupError:
                pass
        else:
            for pid in self._host_children():  # never kill(-1) outside a pid namespace
                kill_quietly(pid, signal.SIGTERM, group=True)

    def _host_children(self) -> list[int]:
        me = os.getpid()  # single-threaded: the main task's children are all our children
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                if self.stopping:
                    self._exit()
                return
            if pid == 0:
                return
            ex = self.by_pid.pop(pid, None)
            if ex is not None:  # else an orphan the namespace left us: reaped silently
                self._exec_reaped(ex, status)

    def _exit(self) -> NoReturn:
        os._exit(0)  # the agent removes spawn.sock; we keep no handle on host paths for it

    # ---- spawn connections

    def _on_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: drop this round, keep serving
                print(f"pid1: accept: {exc}", file=sys.stderr, flush=True)
                return
            conn.setblocking(False)
            if self.isolated and peer_pid(conn) != 0:
                conn.close()  # a process inside the instance (peer pid visible in our namespace)
                continue
            self.sel.register(conn, selectors.EVENT_READ, self._on_conn)
            self.by_conn[conn] = _Exec(conn)

    def _on_conn(self, conn: socket.socket) -> None:
        ex = self.by_conn.get(conn)
        if ex is None:  # closed earlier in this round of events
            return
        try:
            data, fds, flags = self._recv(conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            if not ex.pid:
                self._refuse(ex, "Invalid spawn request: too large")
            return
        if not data:
            self._agent_gone(ex)
            return
        if ex.pid:
            for fd in fds:
                os.close(fd)
            self._control(ex, data)
            return
        try:
            self._spawn(ex, data, fds)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the agent gets an answer
            if not ex.started and ex.conn is not None:
                self._refuse(ex, f"Failed to start the command: {type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)

    def _recv(self, conn: socket.socket) -> tuple[bytes, list[int], int]:
        """One message and the fds it carries (close-on-exec), into a buffer allocated once."""
        size, ancdata, flags, _ = conn.recvmsg_into([self.buffer], FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        return bytes(self.buffer[:size]), list(fds), flags

    def _control(self, ex: _Exec, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            return
        if ex.reaped is not None:
            return
        if msg.get("kill"):
            kill_quietly(ex.pid, signal.SIGKILL, group=True)
        elif isinstance(msg.get("signal"), int):
            kill_quietly(ex.pid, msg["signal"], group=bool(msg.get("group")))

    def _agent_gone(self, ex: _Exec) -> None:
        if ex.pid and ex.reaped is None:
            kill_quietly(ex.pid, signal.SIGKILL, group=True)  # nothing outlives its session unnoticed
        self._close_conn(ex)

    def _close_conn(self, ex: _Exec) -> None:
        if ex.conn is not None:
            del self.by_conn[ex.conn]
            self.sel.unregister(ex.conn)
            ex.conn.close()
            ex.conn = None

    def _send(self, ex: _Exec, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if ex.conn is not None:
            try:
                if fds:
                    socket.send_fds(ex.conn, [json.dumps(msg).encode()], fds)
                else:
                    ex.conn.send(json.dumps(msg).encode())
            except OSError:
                self._close_conn(ex)

    def _spawn(self, ex: _Exec, data: bytes, fds: list[int]) -> None:
        try:
            msg = json.loads(data)
        except ValueError as exc:
            return self._refuse(ex, f"Invalid spawn request: {exc}")
        if isinstance(msg, dict) and "file" in msg:
            return self._file(ex, msg, fds)
        try:
            req = Request(msg)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._refuse(ex, f"Invalid spawn request: {exc}")
        if len(fds) != (0 if req.pty else 3):
            return self._refuse(ex, f"Invalid spawn request: expected {0 if req.pty else 3} file descriptors")
        if self.stopping:
            return self._refuse(ex, "Instance is stopping")
        if not self.isolated and os.getuid() != 0:
            # Unprivileged process driver: "root" (the API's default) means the agent's own user.
            req.uid, req.gid = req.uid or os.getuid(), req.gid or os.getgid()
        if self.reclaimer.limit_hit() and self.reclaimer.groups:
            self.reclaimer.reclaim(self._reap, self.by_pid)  # a fork bomb may have left every process slot taken
        if not req.cwd:
            home = req.env.get("HOME", "")
            req.cwd = home if home and os.path.isdir(home) else "/"
        slave = -1
        if req.pty:
            try:
                ex.pty_master, slave = open_pty(req)
            except OSError as exc:
                return self._refuse(ex, f"Failed to allocate a terminal: {exc.strerror}")
            fds = [slave, slave, slave]
        try:
            try:
                pid = self.spawner.try_spawn(req, fds, self.isolated)
            except OSError as exc:
                return self._refuse(ex, f"Failed to change directory to {req.cwd}: {exc.strerror}")
            if pid is not None:
                ex.pid = pid
                self.by_pid[pid] = ex
                self.reclaimer.command_started(pid)
                self._started(ex)
            else:
                self._fork_spawn(ex, req, fds)
        finally:
            if slave >= 0:
                os.close(slave)  # the command has its own copy now

    def _file(self, ex: _Exec, msg: dict[str, Any], fds: list[int]) -> None:
        """One file request (files.py): answered, with the opened file if there is one, then closed."""
        if fds:
            return self._refuse(ex, "Invalid file request: unexpected file descriptors")
        try:
            answer, fd = files.handle(msg, self.file_root)
        except files.FileError as exc:
            return self._refuse(ex, str(exc)[:MAX_ERROR], exc.code)
        except OSError as exc:
            return self._refuse(ex, f"{exc.strerror}: {str(msg.get('path'))[:MAX_ERROR]}", exc.errno or 0)
        except Exception as exc:  # noqa: BLE001 - a malformed request gets an answer, never a dead pid1
            return self._refuse(ex, f"Invalid file request: {type(exc).__name__}: {exc}"[:MAX_ERROR])
        try:
            self._send(ex, {**answer, "fds": ["file"] if fd >= 0 else []}, [fd] if fd >= 0 else None)
        finally:
            if fd >= 0:
                os.close(fd)
        self._close_conn(ex)

    def _fork_spawn(self, ex: _Exec, req: Request, fds: list[int]) -> None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                pid = os.fork()
            except BlockingIOError:  # EAGAIN: the instance is at its process limit (limits.processes)
                if not self.reclaimer.reclaim(self._reap, self.by_pid):
                    raise
                pid = os.fork()
        except OSError as exc:
            os.close(status_r)
            os.close(status_w)
            more = " (the instance is at its process limit)" if exc.errno == errno.EAGAIN else ""
            return self._refuse(ex, f"Failed to fork: {exc.strerror}{more}")
        if pid == 0:
            exec_child(req, fds, status_w, self.max_fd, self.isolated)
        os.close(status_w)
        os.set_blocking(status_r, False)
        ex.pid, ex.status_r = pid, status_r
        self.by_pid[pid] = ex
        self.reclaimer.command_started(pid)
        self.sel.register(status_r, selectors.EVENT_READ, lambda fd: self._on_status(ex, fd))

    def _started(self, ex: _Exec) -> None:
        """Reply with the command's pid here, a pidfd on it (the agent reads the host's pid off it, so we
        need no handle on the host's /proc) and the PTY master if we opened one; the fds are named."""
        try:
            pidfd = os.pidfd_open(ex.pid)
        except OSError:
            pidfd = -1
        ex.started = True
        sent = [("pidfd", pidfd), ("pty", ex.pty_master)]
        sent = [(name, fd) for name, fd in sent if fd >= 0]
        try:
            self._send(ex, {"pid": ex.pid, "fds": [name for name, _ in sent]}, [fd for _, fd in sent])
        finally:
            for _, fd in sent:
                os.close(fd)
            ex.pty_master = -1

    def _refuse(self, ex: _Exec, text: str, code: int = 0) -> None:
        if ex.pty_master >= 0:
            os.close(ex.pty_master)
            ex.pty_master = -1
        self._send(ex, {"error": text, "errno": code} if code else {"error": text})
        self._close_conn(ex)

    def _on_status(self, ex: _Exec, fd: int) -> None:
        if ex.status_r != fd:  # already settled earlier in this round of events
            return
        try:
            chunk = os.read(ex.status_r, 65536)
        except BlockingIOError:
            return
        if chunk:
            ex.status += chunk
            return
        self._status_done(ex)

    def _status_done(self, ex: _Exec) -> None:
        """The status pipe hit EOF: exec succeeded, or the child reported why it could not get there."""
        self.sel.unregister(ex.status_r)
        os.close(ex.status_r)
        ex.status_r = -1
        if ex.status:  # the child exits on its own; it is reaped without a report
            self._refuse(ex, ex.status.decode(errors="replace"))
        else:
            self._started(ex)

    def _exec_reaped(self, ex: _Exec, status: int) -> None:
        if ex.status_r >= 0:  # died before we saw the status EOF: the pipe holds the whole story now
            os.set_blocking(ex.status_r, True)
            while chunk := os.read(ex.status_r, 65536):
                ex.status += chunk
            self._status_done(ex)
        if not ex.started:
            return
        ex.reaped = status
        self.reclaimer.command_exited(ex.pid)  # its group may live on (background jobs): see reclaim.py
        self._send(ex, {"exit": status})
        self._close_conn(ex)

