"""1. API-level exec of `true` with the bench's own client vs spawning `nsenter -t <pid1> -a true`.

One exec = POST (wait-for-websocket), connect 0/1/2, stdin barrier, stdout/stderr read to their barriers,
then `/wait` for `return`. Sequential, so the figure is latency, not throughput.
"""

from __future__ import annotations

import shutil
import subprocess
import time

from bench.context import Context
from bench.harness import Row, cpu_seconds, ratio, summary_ms
from bench.wire import Api, run_exec

NAME = "exec_latency"
TITLE = "1 API exec `true` (own client)"
TARGET_RATIO = 3.0


async def exec_true(api: Api) -> float:
    """Seconds for one whole exec of `true` in c1."""
    t0 = time.perf_counter()
    out = await run_exec(api, "c1", ["true"])
    dt = time.perf_counter() - t0
    if out.code != 0:
        raise RuntimeError(f"exec true: return {out.code} {out.err}")
    return dt


def nsenter_once(pid: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nsenter", "-t", str(pid), "-a", "true"], check=True)
    return time.perf_counter() - t0


async def run(ctx: Context) -> list[Row]:
    assert ctx.broker is not None and ctx.broker.pid1 is not None and ctx.api is not None
    n = ctx.n(150, 500)
    for _ in range(10):
        await exec_true(ctx.api)
    cpu0 = cpu_seconds(ctx.agent_pid)
    ours = [await exec_true(ctx.api) for _ in range(n)]
    agent_cpu_ms = (cpu_seconds(ctx.agent_pid) - cpu0) * 1e3 / n
    base = None
    if shutil.which("nsenter"):
        for _ in range(5):
            nsenter_once(ctx.broker.pid1)
        base = summary_ms([nsenter_once(ctx.broker.pid1) for _ in range(n)])
    s = summary_ms(ours)
    rows = []
    for p in ("p50", "p95", "p99"):
        b = base[p] if base else None
        row = Row(TITLE, p, s[p], "ms", b, "nsenter -t PID1 -a true", ratio(s[p], b), extra={"n": n})
        if p == "p50":
            row.target = f"<= {TARGET_RATIO:g}x baseline"
            row.met = row.ratio is not None and row.ratio <= TARGET_RATIO
            row.extra.update(ours=s, nsenter=base)
        rows.append(row)
    rows.append(Row(TITLE, "agent CPU per exec", agent_cpu_ms, "ms", s["p50"], "exec p50 (wall)",
                    ratio(agent_cpu_ms, s["p50"]), note="utime+stime of the agent process over the sequential loop"))
    if base is None:
        rows[0].note = "nsenter missing: no baseline"
    # The profiled pass: the same loop with py-spy on the agent; its samples are not in the figures above.
    if ctx.profile is not None:
        seconds = ctx.seconds(3, 8)
        async with ctx.profile(NAME, seconds) as tally:
            end = time.monotonic() + seconds
            while time.monotonic() < end and tally["count"] < 20000:
                await exec_true(ctx.api)
                tally["count"] += 1
    return rows
