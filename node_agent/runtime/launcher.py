"""Agent side of pid1's life: start it detached (process driver; containers: container.py), recognise it
again later, signal it, wait for its end.

pid1 is never a child of the agent: the launcher (our child, in a new session) forks it and exits (or runc
does, detached), so it is reparented to the host's init and outlives the agent and its Ray worker. A process is identified by its host
pid *and* its start time (``/proc/PID/stat`` field 22), which survives agent restarts and rules out pid reuse.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from node_agent.runtime.pid1.syscalls import proc_stat

PID1 = Path(__file__).with_name("pid1")  # a directory run by its __main__
# -I: ignore PYTHON* variables and user site; -S: stdlib only, faster start.
PYTHON_ARGS = ("-I", "-S")


class LaunchError(Exception):
    """pid1 could not be started; the message says why."""


@dataclass(frozen=True)
class Pid1Identity:
    pid: int
    start_time: int


def _python() -> str:
    return sys.executable or "/usr/bin/python3"


def launch(config_path: Path, timeout: float = 30.0) -> Pid1Identity:
    """Start pid1 with the JSON config at ``config_path``. Blocking: run it in a worker thread.

    subprocess forks in C (no Python runs in the child), so this is safe in the multi-threaded agent.
    """
    argv = [_python(), *PYTHON_ARGS, str(PID1), "launch", str(config_path)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            close_fds=True, start_new_session=True, cwd="/",
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LaunchError("Failed to start instance: timed out") from None
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LaunchError(f"Failed to start instance: {err.decode(errors='replace').strip()}") from None
    if "error" in report:
        raise LaunchError(report["error"])
    return Pid1Identity(int(report["pid"]), int(report["start_time"]))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, start time) of a host process, or None if there is no such process."""
    try:
        fields = proc_stat(pid)
    except OSError:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[19])


def identify(pid: int) -> Pid1Identity | None:
    """The identity of a running host process (None if it is gone)."""
    st = _stat(pid)
    return None if st is None or st[0] in ("Z", "X") else Pid1Identity(pid, st[2])


def parent_pid(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[1]


def is_alive(ident: Pid1Identity) -> bool:
    """The very process we launched is still running (not gone, not a zombie, pid not reused). Once
    found alive, the process is watched through a pidfd (readable once it ended): later answers cost a
    poll, not a read of /proc (several per exec)."""
    fd = _watched.get(ident)
    if fd is None:
        if not _alive_by_stat(ident):
            return False
        try:
            fd = os.pidfd_open(ident.pid)
        except OSError:
            return False
        if not _alive_by_stat(ident):  # the pid was reused before the pidfd was taken
            os.close(fd)
            return False
        _watched[ident] = fd
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if poller.poll(0):
        del _watched[ident]
        os.close(fd)
        return False
    return True


_watched: dict[Pid1Identity, int] = {}  # pidfds of the pid1s found alive, until they end


def _alive_by_stat(ident: Pid1Identity) -> bool:
    st = _stat(ident.pid)
    return st is not None and st[2] == ident.start_time and st[0] not in ("Z", "X")


def _pidfd(ident: Pid1Identity) -> int | None:
    """A pidfd on ``ident``, or None if it is gone. Checked after opening, so a pid reuse cannot fool us."""
    try:
        fd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return None
    if not is_alive(ident):
        os.close(fd)
        return None
    return fd


def send_signal(ident: Pid1Identity, sig: int) -> bool:
    """Signal pid1; False if it is already gone."""
    fd = _pidfd(ident)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


async def wait_exit(ident: Pid1Identity, timeout: float | None) -> bool:
    """Wait until pid1 has exited; False on timeout. A pidfd turns readable at exit: no polling."""
    fd = _pidfd(ident)
    if fd is None:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(True))
    try:
        await asyncio.wait_for(exited, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
