"""How pid1 starts one command: the parsed request, the posix_spawn fast path (glibc through ctypes)
and the forked child's set-up (session, controlling terminal, ids, cwd) before exec."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct
import termios
import warnings  # noqa: F401 - os.get_exec_path (execvpe) imports it lazily; after chroot it could not
from typing import Any, NoReturn

from node_agent.runtime.pid1.syscalls import PR_SET_PDEATHSIG, libc, prctl

# Signals Python leaves ignored (SIGPIPE, SIGXFSZ): commands must start with them at their default.
IGNORED_BY_PYTHON = (signal.SIGPIPE, signal.SIGXFSZ)


class Request:
    """A parsed spawn request."""

    def __init__(self, req: dict[str, Any]) -> None:
        self.argv = [str(a) for a in req["argv"]]
        if not self.argv:
            raise ValueError("missing command")
        self.env = {str(k): str(v) for k, v in req["env"].items()}
        self.cwd = str(req.get("cwd") or "")
        self.cwd_given = bool(self.cwd)
        self.uid = int(req.get("uid", 0))
        self.gid = int(req.get("gid", 0))
        self.pty = bool(req.get("pty"))
        self.width = int(req.get("width") or 0)
        self.height = int(req.get("height") or 0)
        if not (0 <= self.width < 65536 and 0 <= self.height < 65536):
            raise ValueError("terminal size out of range")
        if any("\0" in s for s in (*self.argv, *self.env, *self.env.values(), self.cwd)):
            raise ValueError("NUL byte in the command, environment or directory")


class PosixSpawn:
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
            libc.posix_spawn_file_actions_destroy(actions)

    def try_spawn(self, req: Request, fds: list[int], isolated: bool) -> int | None:
        """The fast path: posix_spawn (vfork + exec; no copy of this process's page tables, which costs
        over 1 ms here). Returns None where only a forked child can do the job exactly: another uid/gid,
        no pid namespace (parent death signal), a PTY we cannot name, or an exec that fails (the fork
        path turns that into exit status 127/126). Raises OSError if ``req.cwd`` is unusable."""
        if not isolated or req.uid != os.getuid() or req.gid != os.getgid():
            return None
        path = which(req.argv[0], req.env)
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
            return self.spawn(path, req.argv, req.env, fds, tty)
        except OSError:
            return None
        finally:
            os.chdir("/")


def _spawn_call(name: str, *args: Any) -> None:
    err = getattr(libc, name)(*args)  # the posix_spawn family returns an errno value, not -1
    if err:
        raise OSError(err, os.strerror(err))


def _c_strings(strings: list[str]) -> Any:
    return (ctypes.c_char_p * (len(strings) + 1))(*[os.fsencode(s) for s in strings], None)


def which(name: str, env: dict[str, str]) -> str | None:
    """What execvpe would run for ``name``, searching env's PATH; None if nothing executable is found."""
    if "/" in name:
        return name
    for directory in os.get_exec_path(env):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None



def open_pty(req: Request) -> tuple[int, int]:
    """(master, slave) from this instance's own devpts, sized, the slave owned by the command's user."""
    master, slave = os.openpty()
    try:
        os.set_inheritable(master, False)
        os.set_inheritable(slave, False)
        if req.width and req.height:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", req.height, req.width, 0, 0))
        if req.uid:
            os.fchown(slave, req.uid, req.gid)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def exec_child(req: Request, fds: list[int], status_w: int, max_fd: int, isolated: bool) -> NoReturn:
    """The forked child, between fork and exec (fine: pid1 has a single thread). Never returns: a step
    that fails is reported as text on ``status_w``; an exec that fails exits 127 or 126."""
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
        os.closerange(3, status_w)
        os.closerange(status_w + 1, max_fd)
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
        if not isolated:
            step = "set the parent death signal"
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # no pid namespace to take it down with us
    except BaseException as exc:  # noqa: BLE001 - reported to the agent as text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            write_all(status_w, f"Failed to {step}: {reason}".encode(errors="replace"))
        finally:
            os._exit(1)
    try:
        os.execvpe(req.argv[0], req.argv, req.env)
    except OSError as exc:
        os._exit(127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(126)


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
