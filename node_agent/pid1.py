"""PID 1 of one execbroker instance: init, zombie reaper and spawner in one single-threaded process.

Standalone and stdlib-only on purpose: it runs as ``python -I -S pid1.py launch CONFIG.json`` and, once it
has chrooted into a busybox rootfs, can import nothing more, so every module it uses is imported here at the
top. The agent talks to it with ``node_agent/spawn.py``; ``node_agent/launcher.py`` starts it.

Two processes take part in a start:

* the **launcher** (started by the agent in a new session): joins the instance's freezer cgroup, unshares the
  pid/mount/uts/ipc namespaces, forks pid1, waits for pid1's readiness on a pipe, prints one JSON line
  (``{"pid": N, "start_time": T}`` or ``{"error": "..."}``) and exits, so pid1 is reparented away from the
  agent (it survives the agent and its Ray cluster);
* **pid1**: PID 1 of the new pid namespace. It mounts the instance's filesystems, binds ``spawn.sock`` (a
  host path), chroots, reports readiness and then serves spawn requests until SIGTERM.

Spawn protocol (SOCK_SEQPACKET, one connection per command, one JSON object per message):

* agent -> pid1: ``{"argv", "env", "cwd", "uid", "gid", "pty"}`` carrying fds [stdin, stdout, stderr];
* pid1 -> agent: ``{"pid": P}`` (P in the instance's pid namespace) with a pidfd on the command once exec
  succeeded, or ``{"error": "..."}`` (then closes);
* pid1 -> agent: ``{"exit": <raw wait status>}`` when the command was reaped (then closes);
* agent -> pid1 at any time: ``{"signal": N}`` (main process) or ``{"kill": true}`` (its process group).
  The agent closing the connection while the command runs SIGKILLs the command's process group.

The ``process`` isolation mode runs this same program without namespaces or chroot (development only).
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import warnings  # noqa: F401 - os.get_exec_path (execvpe) imports it lazily; after chroot it could not
from typing import Any, NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

SOCKET_NAME = "spawn.sock"
READY = b"ready"
MAX_REQUEST = 4 << 20  # argv + env of one exec; the kernel's own limit is about 2 MiB
FDS_SPACE = socket.CMSG_SPACE(3 * struct.calcsize("i"))
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Signals Python leaves ignored (SIGPIPE, SIGXFSZ): commands must start with them at their default.
IGNORED_BY_PYTHON = (signal.SIGPIPE, signal.SIGXFSZ)

_libc = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args: Any) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _libc_call("unshare", ctypes.c_int(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    try:
        _libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    except OSError as exc:
        raise OSError(exc.errno, f"mount {source} on {target}: {os.strerror(exc.errno or 0)}") from None


def prctl(option: int, value: int) -> None:
    _libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
               ctypes.c_ulong(0))


def proc_stat(pid: int) -> list[bytes]:
    """Fields 3 and on of /proc/PID/stat (state, ppid, pgrp, ...; the start time, field 22, is [19]).
    Raises OSError if there is no such process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold anything


_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}.get(os.uname().machine)


def _default_disposition_raw(sig: int) -> None:
    """SIG_DFL through the raw rt_sigaction system call: the C library refuses the signals it reserves
    (32, 33), but an ignored disposition of them is inherited across exec all the same."""
    if _RT_SIGACTION is None:
        return
    act = (ctypes.c_ulong * 4)()  # handler SIG_DFL (0), no flags, no restorer, empty mask
    _libc.syscall(ctypes.c_long(_RT_SIGACTION), ctypes.c_int(sig), act, None, ctypes.c_size_t(8))


def reset_signals() -> None:
    """Default dispositions and an empty mask: whatever the agent's (Ray worker's) process had set."""
    for sig in range(1, signal.NSIG):  # not valid_signals(): it leaves out the C library's own (32, 33)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            _default_disposition_raw(sig)  # signals reserved by the C library
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


# --------------------------------------------------------------------------------------------- launcher


def launch(config_path: str) -> int:
    """Start pid1 for the instance described by ``config_path``; print one JSON line; exit."""
    with open(config_path) as f:
        cfg = json.load(f)
    reset_signals()
    os.umask(0o022)
    try:  # Ray makes its workers the OOM killer's first choice; instances must not inherit that.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")
    except OSError:
        pass
    try:
        if cfg.get("cgroup_procs"):
            with open(cfg["cgroup_procs"], "w") as f:
                f.write(str(os.getpid()))
        if cfg["isolation"] == "namespaces":
            unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as exc:
        print(json.dumps({"error": f"Failed to start instance: {exc.strerror or exc}"}), flush=True)
        return 1
    if pid == 0:
        os.close(ready_r)
        try:
            Pid1(cfg, ready_w).serve()
        except BaseException as exc:  # noqa: BLE001 - any failure must reach the launcher as text
            _write_all(ready_w, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        os._exit(1)
    os.close(ready_w)
    report = _read_until_eof(ready_r, timeout=float(cfg.get("ready_timeout", 30)))
    if report == READY:
        print(json.dumps({"pid": pid, "start_time": int(proc_stat(pid)[19])}), flush=True)
        return 0
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
    text = report.decode(errors="replace") or "pid1 exited without reporting"
    print(json.dumps({"error": f"Failed to start instance: {text}"}), flush=True)
    return 1


def _read_until_eof(fd: int, timeout: float) -> bytes:
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    chunks = []
    while sel.select(timeout):
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    return b"timed out waiting for pid1"


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def probe() -> int:
    """Exit 0 when this process may create the namespaces the ``namespaces`` driver needs."""
    try:
        unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC)
    except OSError:
        return 1
    return 0


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


class Pid1:
    def __init__(self, cfg: dict[str, Any], ready_fd: int) -> None:
        self.cfg = cfg
        self.isolated = cfg["isolation"] == "namespaces"
        self.ready_fd = ready_fd
        self.sel = selectors.DefaultSelector()
        self.by_pid: dict[int, _Exec] = {}
        self.by_conn: dict[socket.socket, _Exec] = {}
        self.stopping = False
        self.max_fd = os.sysconf("SC_OPEN_MAX")
        self.buffer = bytearray(MAX_REQUEST)
        self.spawner = _PosixSpawn()

    # ---- setup

    def serve(self) -> NoReturn:
        os.setsid()  # own session: nothing aimed at the launcher's group reaches pid1
        devnull = os.open("/dev/null", os.O_RDWR)
        log = os.open(self.cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        instance_dir = self.cfg["instance_dir"]
        if self.isolated:
            self._mount_filesystems()
            socket.sethostname(self.cfg["name"])
        self.listener = self._listen(instance_dir)
        if self.isolated:
            os.chroot(self.cfg["rootfs"])
        else:
            prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, as they would to a PID 1
        os.chdir("/")
        self._install_signals()
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        _write_all(self.ready_fd, READY)
        os.close(self.ready_fd)
        self._loop()

    def _mount_filesystems(self) -> None:
        root = self.cfg["rootfs"]
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate to the host
        mount(root, root, None, MS_BIND | MS_REC)
        for bind in self.cfg.get("binds", []):
            target = os.path.join(root, bind["target"].lstrip("/"))
            mount(bind["source"], target, None, MS_BIND | MS_REC)
            if bind.get("readonly"):
                mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        dev = f"{root}/dev"
        mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
        for name in DEVICES:
            open(f"{dev}/{name}", "w").close()
            mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
        for name in ("pts", "shm"):
            os.mkdir(f"{dev}/{name}", 0o755)
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for link, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{dev}/{link}")
        mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

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
        sock.listen(512)
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
                _kill_quietly(pid, signal.SIGTERM, group=True)

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
            if self.isolated and _peer_pid(conn) != 0:
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
            _kill_quietly(ex.pid, signal.SIGKILL, group=True)
        elif isinstance(msg.get("signal"), int):
            _kill_quietly(ex.pid, msg["signal"], group=False)

    def _agent_gone(self, ex: _Exec) -> None:
        if ex.pid and ex.reaped is None:
            _kill_quietly(ex.pid, signal.SIGKILL, group=True)  # nothing outlives its session unnoticed
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
            req = _Request(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._refuse(ex, f"Invalid spawn request: {exc}")
        if len(fds) != 3:
            return self._refuse(ex, "Invalid spawn request: expected 3 file descriptors")
        if self.stopping:
            return self._refuse(ex, "Instance is stopping")
        if not self.isolated and os.getuid() != 0:
            # Unprivileged process driver: "root" (the API's default) means the agent's own user.
            req.uid, req.gid = req.uid or os.getuid(), req.gid or os.getgid()
        if not req.cwd:
            home = req.env.get("HOME", "")
            req.cwd = home if home and os.path.isdir(home) else "/"
        try:
            pid = self._posix_spawn(req, fds)
        except OSError as exc:
            return self._refuse(ex, f"Failed to change directory to {req.cwd}: {exc.strerror}")
        if pid is not None:
            ex.pid = pid
            self.by_pid[pid] = ex
            self._started(ex)
        else:
            self._fork_spawn(ex, req, fds)

    def _posix_spawn(self, req: _Request, fds: list[int]) -> int | None:
        """The fast path: posix_spawn (vfork + exec; no copy of this process's page tables, which costs
        over 1 ms here). Returns None where only a forked child can do the job exactly: another uid/gid,
        no pid namespace (parent death signal), a PTY we cannot name, or an exec that fails (the fork
        path turns that into exit status 127/126). Raises OSError if ``req.cwd`` is unusable."""
        if not self.isolated or req.uid != os.getuid() or req.gid != os.getgid():
            return None
        path = _which(req.argv[0], req.env)
        if path is None:
            return None
        tty = None
        if req.pty:
            try:  # opened again by name after setsid(), the PTY becomes the controlling terminal
                tty = os.ttyname(fds[0])
            except OSError:
                return None
        os.chdir(req.cwd)  # all our fds are close-on-exec: the child gets exactly 0, 1 and 2
        try:
            return self.spawner.spawn(path, req.argv, req.env, fds, tty)
        except OSError:
            return None
        finally:
            os.chdir("/")

    def _fork_spawn(self, ex: _Exec, req: _Request, fds: list[int]) -> None:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(status_r)
            os.close(status_w)
            return self._refuse(ex, f"Failed to fork: {exc.strerror}")
        if pid == 0:
            self._child(req, fds, status_w)
        os.close(status_w)
        os.set_blocking(status_r, False)
        ex.pid, ex.status_r = pid, status_r
        self.by_pid[pid] = ex
        self.sel.register(status_r, selectors.EVENT_READ, lambda fd: self._on_status(ex, fd))

    def _started(self, ex: _Exec) -> None:
        """Reply with the command's pid here and a pidfd on it: the agent reads the host's pid off the pidfd
        (its fdinfo, through the agent's own procfs), so we need no handle on the host's /proc."""
        try:
            pidfd = os.pidfd_open(ex.pid)
        except OSError:
            pidfd = -1
        ex.started = True
        try:
            self._send(ex, {"pid": ex.pid}, [pidfd] if pidfd >= 0 else None)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _refuse(self, ex: _Exec, text: str) -> None:
        self._send(ex, {"error": text})
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
        self._send(ex, {"exit": status})
        self._close_conn(ex)

    # ---- the forked child (never returns)

    def _child(self, req: _Request, fds: list[int], status_w: int) -> NoReturn:
        """Runs Python between fork and exec: fine here, this process has a single thread."""
        step = "start"
        try:
            signal.set_wakeup_fd(-1)
            for sig in (*IGNORED_BY_PYTHON, signal.SIGCHLD, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            step = "set up stdio"
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            if req.pty:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                if req.uid:
                    try:
                        os.fchown(0, req.uid, req.gid)
                    except OSError:
                        pass
            os.closerange(3, status_w)
            os.closerange(status_w + 1, self.max_fd)
            if os.getuid() == 0:
                step = "set supplementary groups"
                os.setgroups([])
            if req.gid != os.getgid():
                step = f"set group ID {req.gid}"
                os.setgid(req.gid)
            if req.uid != os.getuid():
                step = f"set user ID {req.uid}"
                os.setuid(req.uid)
            step = f"change directory to {req.cwd}"
            try:
                os.chdir(req.cwd)
            except OSError:
                if req.cwd_given:
                    raise
                os.chdir("/")  # $HOME was only a default: a user who may not enter it starts in /
            if not self.isolated:
                step = "set the parent death signal"
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # no pid namespace to take it down with us
        except BaseException as exc:  # noqa: BLE001 - reported to the agent as text
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            try:
                _write_all(status_w, f"Failed to {step}: {reason}".encode(errors="replace"))
            finally:
                os._exit(1)
        try:
            os.execvpe(req.argv[0], req.argv, req.env)
        except OSError as exc:
            os._exit(127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126)
        except BaseException:  # noqa: BLE001
            pass
        os._exit(126)


class _Request:
    """A parsed spawn request."""

    def __init__(self, data: bytes) -> None:
        req = json.loads(data)
        self.argv = [str(a) for a in req["argv"]]
        if not self.argv:
            raise ValueError("missing command")
        self.env = {str(k): str(v) for k, v in req["env"].items()}
        self.cwd = str(req.get("cwd") or "")
        self.cwd_given = bool(self.cwd)
        self.uid = int(req.get("uid", 0))
        self.gid = int(req.get("gid", 0))
        self.pty = bool(req.get("pty"))


class _PosixSpawn:
    """glibc's posix_spawn through ctypes, not os.posix_spawn: glibc leaves its internal signals (32, 33)
    ignored in the child unless they are in the "sigdefault" set, and only a raw sigset can name them."""

    SETSIGDEF, SETSIGMASK, SETSID = 0x04, 0x08, 0x80
    SIGSET_BYTES = 128  # glibc's sigset_t

    def __init__(self) -> None:
        self.attr = ctypes.create_string_buffer(1024)  # posix_spawnattr_t is 336 bytes on x86-64
        _spawn_call("posix_spawnattr_init", self.attr)
        _spawn_call("posix_spawnattr_setflags", self.attr,
                    ctypes.c_short(self.SETSIGDEF | self.SETSIGMASK | self.SETSID))
        _spawn_call("posix_spawnattr_setsigmask", self.attr, ctypes.create_string_buffer(self.SIGSET_BYTES))
        every_signal = ctypes.create_string_buffer(b"\xff" * self.SIGSET_BYTES, self.SIGSET_BYTES)
        _spawn_call("posix_spawnattr_setsigdefault", self.attr, every_signal)

    def spawn(self, path: str, argv: list[str], env: dict[str, str], fds: list[int], tty: str | None) -> int:
        actions = ctypes.create_string_buffer(1024)  # posix_spawn_file_actions_t is 80 bytes on x86-64
        _spawn_call("posix_spawn_file_actions_init", actions)
        try:
            if tty is not None:
                _spawn_call("posix_spawn_file_actions_addopen", actions, 0, os.fsencode(tty), os.O_RDWR, 0)
                _spawn_call("posix_spawn_file_actions_adddup2", actions, 0, 1)
                _spawn_call("posix_spawn_file_actions_adddup2", actions, 0, 2)
            else:
                for target, fd in enumerate(fds):
                    _spawn_call("posix_spawn_file_actions_adddup2", actions, fd, target)
            pid = ctypes.c_int()
            _spawn_call("posix_spawn", ctypes.byref(pid), os.fsencode(path), actions, self.attr,
                        _c_strings(argv), _c_strings([f"{k}={v}" for k, v in env.items()]))
            return pid.value
        finally:
            _libc.posix_spawn_file_actions_destroy(actions)


def _spawn_call(name: str, *args: Any) -> None:
    err = getattr(_libc, name)(*args)  # the posix_spawn family returns an errno value, not -1
    if err:
        raise OSError(err, os.strerror(err))


def _c_strings(strings: list[str]) -> Any:
    return (ctypes.c_char_p * (len(strings) + 1))(*[os.fsencode(s) for s in strings], None)


def _which(name: str, env: dict[str, str]) -> str | None:
    """What execvpe would run for ``name``, searching env's PATH; None if nothing executable is found."""
    if "/" in name:
        return name
    for directory in os.get_exec_path(env):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _peer_pid(conn: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def _kill_quietly(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
    except OSError:
        pass
    try:  # the main process too: it may not have become its group's leader yet
        os.kill(pid, sig)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "launch":
        return launch(argv[2])
    if len(argv) == 2 and argv[1] == "probe":
        return probe()
    print("usage: pid1.py launch CONFIG.json | probe", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
