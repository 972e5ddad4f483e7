"""12. Detachable execs (extension exec_detach): reattach latency and the memory of detached sessions.

Reattach: a detachable exec has written 100 kB and waits; each sample opens its stdout websocket again
with ``?offset=0`` and times the handshake to the first replayed byte. Baseline, interleaved: opening
the events websocket and getting nothing (the same handshake, no replay). Memory: 20 detached sessions,
each having written 4 MiB into a 1 MiB buffer with nobody attached; the agent's RSS growth per session
against the buffer it is allowed to hold.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.context import Context
from bench.harness import Row, ratio, summary_ms, vm_rss_kib
from bench.wire import Api

NAME = "detach"
TITLE = "12 detachable exec"
REATTACH_TARGET_MS = 5.0
SESSIONS = 20
BUFFER = 1 << 20


async def _detached(api: Api, script: str, buffer: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"command": ["sh", "-c", script], "wait-for-websocket": True, "detachable": True}
    if buffer is not None:
        body["buffer-size"] = buffer
    return (await api.call("POST", "/1.0/instances/c1/exec", body))["metadata"]


async def _produced(api: Api, op_id: str, want: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (await api.get(f"/1.0/operations/{op_id}"))["metadata"]["detach"]["streams"]["1"]["produced"] < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"operation {op_id} did not produce {want} bytes")
        await asyncio.sleep(0.05)


async def run(ctx: Context) -> list[Row]:
    api = Api(ctx.broker.socket if ctx.broker else "")
    ops: list[str] = []
    try:
        op = await _detached(api, "head -c 100000 /dev/zero; sleep 120")
        ops.append(op["id"])
        await _produced(api, op["id"], 100000)
        url = f"/1.0/operations/{op['id']}/websocket?secret={op['metadata']['fds']['1']}&offset=0"
        ours, base = [], []
        for _ in range(ctx.n(20, 100)):
            t0 = time.perf_counter()
            ws = await api.websocket(url)
            await ws.recv()
            ours.append(time.perf_counter() - t0)
            ws.transport.abort()  # a client that vanishes; the next one takes over
            t0 = time.perf_counter()
            events = await api.websocket("/1.0/events?type=lifecycle")
            base.append(time.perf_counter() - t0)
            await events.close()
        s, b = summary_ms(ours), summary_ms(base)
        rss0 = vm_rss_kib(ctx.agent_pid)
        for _ in range(SESSIONS):
            detached = await _detached(api, "head -c 4194304 /dev/zero; sleep 120", BUFFER)
            ops.append(detached["id"])
        for op_id in ops[1:]:
            await _produced(api, op_id, 4 << 20)
        per_session_kib = (vm_rss_kib(ctx.agent_pid) - rss0) / SESSIONS
    finally:
        for op_id in ops:
            try:
                await api.call("DELETE", f"/1.0/operations/{op_id}")
            except Exception:  # noqa: BLE001 - ended already
                pass
        await api.aclose()
    return [
        Row(TITLE, "reattach: handshake to first replayed byte, p50", s["p50"], "ms", b["p50"],
            "events websocket handshake", ratio(s["p50"], b["p50"]), f"<= {REATTACH_TARGET_MS:g} ms",
            s["p50"] <= REATTACH_TARGET_MS, f"n={s['n']}, p99 {s['p99']:.2f} ms", extra={"ours": s, "base": b}),
        Row(TITLE, "agent RSS per detached session", per_session_kib, "KiB", BUFFER / 1024,
            "its 1 MiB stdout buffer", ratio(per_session_kib, BUFFER / 1024), "<= 1.5x the buffer",
            per_session_kib <= 1.5 * BUFFER / 1024, f"{SESSIONS} sessions, 4 MiB written each, nobody attached"),
    ]
