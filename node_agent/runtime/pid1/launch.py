"""The launcher: the short-lived process that starts pid1 (joins the freezer cgroup, unshares the
namespaces, forks pid1, waits for its readiness), prints one JSON line and exits."""

from __future__ import annotations

import json
import os
import selectors
import signal

from node_agent.runtime.pid1.server import READY, Pid1
from node_agent.runtime.pid1.spawner import write_all
from node_agent.runtime.pid1.syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    proc_stat,
    reset_signals,
    unshare,
)


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
            write_all(ready_w, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
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



def probe() -> int:
    """Exit 0 when this process may create the namespaces the ``namespaces`` driver needs."""
    try:
        unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC)
    except OSError:
        return 1
    return 0

