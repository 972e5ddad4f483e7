"""pid1's system interface: the libc calls Python's os module lacks (prctl, raw
rt_sigaction), signal resets, /proc/PID/stat parsing, peer credentials and quiet signalling of
processes and groups. Stdlib only (see __init__)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

libc = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args: Any) -> None:
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


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
    libc.syscall(ctypes.c_long(_RT_SIGACTION), ctypes.c_int(sig), act, None, ctypes.c_size_t(8))


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


def peer_pid(conn: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def kill_quietly(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
    except OSError:
        pass
    try:  # the main process too: it may not have become its group's leader yet
        os.kill(pid, sig)
    except OSError:
        pass
