"""How pid1 comes to life.

* In a container (``pid1 container``): runc has made the namespaces, mounts and root; pid1 is the
  container's process and finds its listening socket and readiness pipe on fds 3 and 4.
* With the process driver (``pid1 launch CONFIG.json``, development only): the launcher, started by the
  agent in a new session, joins the instance's freezer cgroup, forks pid1, waits for its readiness,
  prints one JSON line (``{"pid": N, "start_time": T}`` or ``{"error": "..."}``) and exits, so pid1 is
  reparented away from the agent.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket

from node_agent.runtime.pid1.server import READY, Pid1
from node_agent.runtime.pid1.spawner import write_all
from node_agent.runtime.pid1.syscalls import proc_stat, reset_signals

LISTEN_FD, READY_FD = 3, 4


def container() -> int:
    """pid1 as the container's process (never returns while it serves)."""
    try:
        for name in os.listdir("/proc/self/fd"):  # fds 3 and 4 and anything else runc left open:
            if int(name) > 2:                       # no command may inherit them
                try:
                    os.set_inheritable(int(name), False)
                except OSError:
                    pass  # the directory fd listdir used, closed by now
        listener = socket.socket(fileno=LISTEN_FD)
    except OSError as exc:
        write_all(READY_FD, f"no listening socket on fd {LISTEN_FD}: {exc}".encode())
        return 1
    try:
        Pid1(isolated=True, ready_fd=READY_FD).serve_container(listener)
    except BaseException as exc:  # noqa: BLE001 - any failure must reach the agent as text
        write_all(READY_FD, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
    return 1


def launch(config_path: str) -> int:
    """Start a process-driver pid1 for the instance described by ``config_path``; print one JSON line."""
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
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as exc:
        print(json.dumps({"error": f"Failed to start instance: {exc.strerror or exc}"}), flush=True)
        return 1
    if pid == 0:
        os.close(ready_r)
        try:
            Pid1(isolated=False, ready_fd=ready_w).serve_process(cfg["instance_dir"], cfg["log"])
        except BaseException as exc:  # noqa: BLE001 - any failure must reach the launcher as text
            write_all(ready_w, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        os._exit(1)
    os.close(ready_w)
    report = read_until_eof(ready_r, timeout=float(cfg.get("ready_timeout", 30)))
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


def read_until_eof(fd: int, timeout: float) -> bytes:
    """What a readiness pipe carries until its writer closes it (b"ready", or why not); a note if that
    takes longer than ``timeout`` seconds between reads."""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    chunks = []
    try:
        while sel.select(timeout):
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        sel.close()
    return b"timed out waiting for pid1"
