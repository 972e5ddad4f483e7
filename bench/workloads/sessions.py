"""5. Concurrent sessions: N execs of `cat` open at once, each streaming stdin and reading it back byte-exact.

Per level N (10, 100, 1000, and 10,000 in a full run): open all N sessions (POST + sockets 0/1/2, at most SETUP_PARALLEL at a time),
then all stream for a bounded time with at most WINDOW bytes in flight each, then send the barrier, read
the rest, check every byte and `return` 0. The agent's VmRSS is read before opening, sampled while all
sessions stream (the peak), and after they closed; growth per session = (peak - before) / N.
Bounded everywhere: per-session deadline, count caps; a session that misses its deadline is a hang.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from websockets.exceptions import ConnectionClosed

from bench.context import Context
from bench.harness import Row, fd_count, nofile_limit, raise_nofile, vm_rss_kib
from bench.wire import Exec, drain, start_exec

NAME = "sessions"
TITLE = "5 concurrent sessions (cat)"
LEVELS = (10, 100, 1000, 10_000)
QUICK_LEVELS = (10, 100, 1000)
BUDGET = {"quick": 100, "full": 900}  # seconds: 10,000 sessions take a few minutes to open and close
CHUNK = 16 << 10
WINDOW = 64 << 10
SETUP_PARALLEL = 32
PATTERN = random.Random(5).randbytes(1 << 20)
PATTERN2 = PATTERN + PATTERN  # any stream window of <= 1 MiB is one slice of this


def expected(offset: int, n: int) -> memoryview:
    start = offset % len(PATTERN)
    return memoryview(PATTERN2)[start:start + n]


@dataclass
class Session:
    index: int
    ex: Exec | None = None
    sent: int = 0
    received: int = 0
    error: str = ""
    hung: bool = False
    returned: int | None = None
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def origin(self) -> int:  # each session streams its own part of the pattern
        return self.index * 7919


async def _open(ctx: Context, s: Session, gate: asyncio.Semaphore) -> None:
    assert ctx.api is not None
    async with gate:
        try:
            s.ex = await start_exec(ctx.api, "c1", ["cat"])
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            s.error = f"open: {type(exc).__name__}: {exc}"


async def _stream(s: Session, stop_at: float) -> None:
    assert s.ex is not None
    ws0, ws1 = s.ex.ws["0"], s.ex.ws["1"]

    async def send() -> None:
        while time.monotonic() < stop_at:
            while s.sent - s.received >= WINDOW:
                s.progress.clear()
                await s.progress.wait()
            await ws0.send(expected(s.origin + s.sent, CHUNK), text=False)
            s.sent += CHUNK
        await ws0.send("")  # EOF: cat exits once it has written everything back

    async def receive() -> None:
        while True:
            msg = await ws1.recv()
            if isinstance(msg, str):
                return
            if msg != expected(s.origin + s.received, len(msg)):
                raise RuntimeError(f"byte mismatch at offset {s.received}")
            s.received += len(msg)
            if s.received > s.sent:
                raise RuntimeError("received more than sent")
            s.progress.set()

    await asyncio.gather(send(), receive(), drain(s.ex.ws["2"]))
    op = await s.ex.wait(30)
    s.returned = (op.get("metadata") or {}).get("return")
    if s.received != s.sent:
        raise RuntimeError(f"sent {s.sent} bytes, got back {s.received}")
    if s.returned != 0:
        raise RuntimeError(f"return {s.returned} {op.get('err')}")


async def _run_session(s: Session, stop_at: float, deadline: float) -> None:
    if s.ex is None:
        return
    try:
        await asyncio.wait_for(_stream(s, stop_at), max(1.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        s.hung = True
        s.error = f"no end within the deadline (sent {s.sent}, received {s.received})"
    except (ConnectionClosed, Exception) as exc:  # noqa: BLE001 - counted as a failure
        s.error = s.error or f"{type(exc).__name__}: {exc}"
    finally:
        s.ex.abort()


async def level(ctx: Context, n: int, stream_s: float) -> dict[str, object]:
    pid = ctx.agent_pid
    await asyncio.sleep(0.5)
    rss_before, fds_before = vm_rss_kib(pid), fd_count(pid)
    sessions = [Session(i) for i in range(n)]
    gate = asyncio.Semaphore(SETUP_PARALLEL)
    t_open = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(_open(ctx, s, gate) for s in sessions)), 60 + n * 0.1)
    open_s = time.monotonic() - t_open
    opened = sum(1 for s in sessions if s.ex is not None)
    stop_at = time.monotonic() + stream_s
    deadline = stop_at + 30 + n * 0.02
    peak = {"rss": vm_rss_kib(pid), "fds": fd_count(pid)}

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.25)
            peak["rss"] = max(peak["rss"], vm_rss_kib(pid))
            peak["fds"] = max(peak["fds"], fd_count(pid))

    sampler = asyncio.ensure_future(sample())
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(_run_session(s, stop_at, deadline) for s in sessions))
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - t0
    # After: past the operations' 5 s retention at the top level, so what stays is not just kept records.
    await asyncio.sleep(6.0 if n >= 1000 else 1.0)
    rss_after, fds_after = vm_rss_kib(pid), fd_count(pid)
    failures = [s for s in sessions if s.error]
    total = sum(s.received for s in sessions)
    return {
        "n": n, "opened": opened, "open_s": open_s, "stream_s": stream_s, "elapsed_s": elapsed,
        "bytes": total, "mib_s": total / (1 << 20) / elapsed,
        "failures": len(failures), "hangs": sum(1 for s in sessions if s.hung),
        "errors": sorted({s.error for s in failures})[:5],
        "rss_before_kib": rss_before, "rss_peak_kib": peak["rss"], "rss_after_kib": rss_after,
        "growth_per_session_kib": (peak["rss"] - rss_before) / n,
        "agent_fds": {"before": fds_before, "peak": peak["fds"], "after": fds_after},
    }


async def run(ctx: Context) -> list[Row]:
    """Each level's throughput and agent RSS growth per session; the top level's RSS row carries the
    check of its sessions (byte-exact, none hung): its KiB target is bench/targets.py's."""
    soft, hard = raise_nofile()
    agent_limit = nofile_limit(ctx.agent_pid)
    stream_s = ctx.seconds(2, 8)
    levels = QUICK_LEVELS if ctx.quick else LEVELS
    rows = []
    for n in levels:
        if 3 * n + 100 > soft:
            rows.append(Row(TITLE, f"{n} sessions: RSS growth/session", None, "KiB",
                            note=f"not measured: RLIMIT_NOFILE {soft}/{hard} here (the hard limit cannot be "
                                 f"raised), {n} sessions need ~{3 * n} fds in the bench and ~{7 * n} in the agent"))
            continue
        r = await level(ctx, n, stream_s)
        ok = r["failures"] == 0 and r["hangs"] == 0 and r["opened"] == n
        growth = float(r["growth_per_session_kib"])  # type: ignore[arg-type]
        note = (f"{r['failures']} failed, {r['hangs']} hung, {r['opened']}/{n} opened in {r['open_s']:.1f}s; "
                f"RSS {r['rss_before_kib'] // 1024}->{r['rss_peak_kib'] // 1024}->{r['rss_after_kib'] // 1024} MiB")
        if r["errors"]:
            note += f"; e.g. {r['errors'][0]}"
        row = Row(TITLE, f"{n} sessions: throughput", r["mib_s"], "MiB/s", note=note, extra=r)  # type: ignore[arg-type]
        rows.append(row)
        rows.append(Row(TITLE, f"{n} sessions: RSS growth/session", growth, "KiB",
                        met=ok if n == levels[-1] else None,
                        note=f"agent fds peak {r['agent_fds']['peak']}, limit {agent_limit}"
                             + ("" if ok else "; NOT byte-exact or not all ended")))  # type: ignore[index]
        if not ok and n < levels[-1]:
            rows[-1].note += "; stopped: a smaller level already failed"
            break
    return rows
