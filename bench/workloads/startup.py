"""7. `execbroker up` to the first successful exec, in seconds.

The figure is the bench's own broker start (Popen of `execbroker up` -> `true` returned 0 through the API).
Baseline, measured before that broker starts so the two never share the machine: `ray start --head --block`
alone in its own temp dir and process group, until it prints "Ray runtime started."; then that child is
terminated (never `ray stop`) and the bench checks nothing of it is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

from bench.context import Context
from bench.harness import BIN, Row, ratio, wait_gone

NAME = "startup"
TITLE = "7 `execbroker up` -> first exec"
READY_LINE = "Ray runtime started"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_ray_start(timeout: float = 120) -> dict[str, Any]:
    """Seconds from Popen of `ray start --head --block` to its ready line; cleans up after itself."""
    base = tempfile.mkdtemp(prefix="ebbench-ray-", dir="/tmp")
    temp = os.path.join(base, "t")
    env = {**os.environ, "RAY_TMPDIR": temp}
    # as `execbroker up` starts its head (broker/raynode.py), without the labels
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
           "--node-ip-address=127.0.0.2", f"--temp-dir={temp}", "--include-dashboard=false",
           "--disable-usage-stats"]
    ready = threading.Event()
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    result: dict[str, Any] = {}
    try:
        if ready.wait(timeout) and proc.poll() is None:
            result["seconds"] = time.perf_counter() - t0
        else:
            result["error"] = "ray start did not get ready: " + "".join(lines[-5:]).strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this bench started, nothing else
                proc.wait(10)
        left = wait_gone(base, 30)
        if left:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            left = wait_gone(base, 10)
        result["leftovers"] = [cmd for _, cmd in left]
        if not left:
            shutil.rmtree(base, ignore_errors=True)
    return result


async def run(ctx: Context) -> list[Row]:
    assert ctx.broker is not None
    ray = ctx.baselines.get("ray_start") or {}
    up, ready = ctx.broker.first_exec_s, ctx.broker.ready_s
    note = f"n=1; 'serving on' after {ready:.2f}s" if ready else "n=1"
    if "error" in ray:
        note += f"; baseline failed: {ray['error']}"
    if ray.get("leftovers"):
        note += f"; ray start left {len(ray['leftovers'])} processes"
    return [Row(TITLE, "seconds", up, "s", ray.get("seconds"), "`ray start --head` alone",
                ratio(up, ray.get("seconds")), note=note, extra={"ray_start": ray})]
