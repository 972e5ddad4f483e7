"""6. Exec rate at saturation: `true` by many concurrent clients for a bounded time.

task mode: POST without wait-for-websocket, then `/wait`. websocket mode: the full exec of workload 1.
Baseline: this machine's raw process spawn rate, fork+exec+wait of /bin/true by one `sh` loop per core.
"""

from __future__ import annotations

import asyncio
import os
import time

from bench.context import Context
from bench.harness import Row, ratio
from bench.wire import WireError, run_exec

NAME = "exec_rate"
TITLE = "6 exec rate at saturation"
CONCURRENCY = 16
MAX_EXECS = 50_000


async def _task_exec(ctx: Context) -> None:
    assert ctx.api is not None
    doc = await ctx.api.call("POST", "/1.0/instances/c1/exec",
                             {"command": ["true"], "wait-for-websocket": False, "record-output": False})
    op = await ctx.api.finish(doc, 60)
    if (op.get("metadata") or {}).get("return") != 0:
        raise WireError(f"task exec: {op}")


async def _ws_exec(ctx: Context) -> None:
    assert ctx.api is not None
    out = await run_exec(ctx.api, "c1", ["true"])
    if out.code != 0:
        raise WireError(f"websocket exec: return {out.code} {out.err}")


async def saturate(ctx: Context, one, seconds: float) -> dict[str, float]:
    end = time.monotonic() + seconds
    done = errors = 0
    first_error = ""

    async def worker() -> None:
        nonlocal done, errors, first_error
        while time.monotonic() < end and done + errors < MAX_EXECS:
            try:
                await asyncio.wait_for(one(ctx), 60)
                done += 1
            except Exception as exc:  # noqa: BLE001 - counted
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - t0
    return {"execs": done, "errors": errors, "elapsed_s": elapsed, "rate": done / elapsed,
            "first_error": first_error}  # type: ignore[dict-item]


def spawn_rate(seconds: float) -> dict[str, float]:
    """fork+exec+wait of /bin/true, one shell loop per CPU, sized from a short calibration."""
    import subprocess

    cpus = os.cpu_count() or 1

    def loops(count: int) -> float:
        script = f'i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done'
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["sh", "-c", script]) for _ in range(cpus)]
        for p in procs:
            p.wait(timeout=seconds * 10 + 30)
        return time.perf_counter() - t0

    calib = 200
    per_s = calib * cpus / loops(calib)
    count = max(calib, min(int(per_s * seconds / cpus), 200_000))
    elapsed = loops(count)
    return {"rate": count * cpus / elapsed, "procs": cpus, "execs": count * cpus, "elapsed_s": elapsed}


async def run(ctx: Context) -> list[Row]:
    seconds = ctx.seconds(2, 6)
    base = spawn_rate(seconds)
    task = await saturate(ctx, _task_exec, seconds)
    ws = await saturate(ctx, _ws_exec, seconds)
    rows = []
    for label, r in (("task mode", task), ("websocket mode", ws)):
        note = f"{r['execs']} execs, {r['errors']} errors, {CONCURRENCY} clients"
        if r["errors"]:
            note += f"; e.g. {r['first_error']}"
        rows.append(Row(TITLE, label, r["rate"], "execs/s", base["rate"], f"host fork+exec ({base['procs']} sh loops)",
                        ratio(r["rate"], base["rate"]), note=note, extra={"run": r, "baseline": base}))
    return rows
