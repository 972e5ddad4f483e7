"""9. Exec rate on 1 and 2 front-end processes (``execbroker up --workers N``), same run, same machine.

Runs after the bench's own broker stopped, like the cluster: a broker with 1 worker, then one with 2, each
its own `execbroker up`, saturated with the exec-rate workload's clients (task mode, then websocket mode).
Besides the rates it reports where the CPU went: the agent's and each worker's CPU over the run (from
/proc), and how many execs each process ran (an operation's id names its process)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from bench.context import Context
from bench.harness import Row, broker_with_workers, cpu_seconds, ratio
from bench.wire import Api, run_exec
from bench.workloads.exec_rate import CONCURRENCY

NAME = "workers"
TITLE = "9 exec rate, 2 front-end processes vs 1"
BUDGET = {"quick": 200, "full": 300}


async def _saturate(api: Api, mode: str, seconds: float) -> dict[str, Any]:
    end = time.monotonic() + seconds
    by_process: dict[str, int] = {}
    errors = 0
    first_error = ""

    async def one() -> str:
        if mode == "task":
            doc = await api.call("POST", "/1.0/instances/c1/exec",
                                 {"command": ["true"], "wait-for-websocket": False, "record-output": False})
            op = await api.finish(doc, 60)
            if (op.get("metadata") or {}).get("return") != 0:
                raise RuntimeError(f"task exec: {op}")
            return str(op["id"])
        out = await run_exec(api, "c1", ["true"])
        if out.code != 0:
            raise RuntimeError(f"websocket exec: return {out.code} {out.err}")
        return "ws"

    async def client() -> None:
        nonlocal errors, first_error
        while time.monotonic() < end:
            try:
                op_id = await asyncio.wait_for(one(), 60)
            except Exception as exc:  # noqa: BLE001 - counted
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            key = op_id[-2:] if op_id != "ws" else "ws"
            by_process[key] = by_process.get(key, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - t0
    done = sum(by_process.values())
    return {"execs": done, "rate": done / elapsed, "elapsed_s": elapsed, "errors": errors,
            "first_error": first_error, "by_process": by_process}


async def _measure(processes: int, seconds: float) -> dict[str, Any]:
    async with broker_with_workers(processes) as (_broker, api, pids):
        out: dict[str, Any] = {"pids": pids}
        for mode in ("task", "websocket"):
            before = {pid: cpu_seconds(pid) for pid in pids}
            self_before = time.process_time()
            run = await _saturate(api, mode, seconds)
            run["cpu_s"] = {str(i): round(cpu_seconds(pid) - before[pid], 2) for i, pid in enumerate(pids)}
            run["client_cpu_s"] = round(time.process_time() - self_before, 2)
            out[mode] = run
        return out


async def run(ctx: Context) -> list[Row]:
    seconds = ctx.seconds(3, 6)
    one = await _measure(1, seconds)
    two = await _measure(2, seconds)
    cores = os.cpu_count() or 1
    rows = []
    for mode in ("task", "websocket"):
        a, b = one[mode], two[mode]
        cpu_a, cpu_b = sum(a["cpu_s"].values()), sum(b["cpu_s"].values())
        note = (f"{cores} cores, {CONCURRENCY} clients; 1 process: {a['execs']} execs, broker CPU "
                f"{cpu_a:.1f} s ({1000 * cpu_a / max(a['execs'], 1):.2f} ms/exec); 2 processes: {b['execs']} "
                f"execs, CPU agent {b['cpu_s']['0']:.1f} s + worker {b['cpu_s'].get('1', 0):.1f} s "
                f"({1000 * cpu_b / max(b['execs'], 1):.2f} ms/exec), client {b['client_cpu_s']:.1f} s")
        if mode == "task":
            note += f", execs by process {dict(sorted(b['by_process'].items()))}"
        if a["errors"] or b["errors"]:
            note += f"; errors {a['errors']}/{b['errors']}: {a['first_error'] or b['first_error']}"
        rows.append(Row(TITLE, f"{mode} mode, 2 processes", b["rate"], "execs/s", a["rate"], "1 process (same run)",
                        ratio(b["rate"], a["rate"]), note=note, extra={"one": a, "two": b}))
    return rows
