"""5. Concurrent sessions: N execs of `cat` open at once, each streaming stdin and reading it back byte-exact.

Per level N (10, 100, 1000, and 10,000 in a full run): open all N sessions (POST + sockets 0/1/2, at most
SETUP_PARALLEL at a time per client process), then all stream for a bounded time with at most WINDOW bytes in
flight each, then send the barrier, read the rest, check every byte and `return` 0. The front end's VmRSS (the
agent's, plus its workers' when it has some) is read before opening, sampled while all sessions stream (the
peak), and after they closed; growth per session = (peak - before) / N.

A level one process cannot hold under RLIMIT_NOFILE (whose hard limit may not be raisable: 20,000 here)
runs on a broker of its own with worker processes (``execbroker up --workers P``: each holds its own
sessions' fds) and with the client split over processes, both sized from the limit; its exit codes come
from the audit records instead of a wait per session. Bounded everywhere: per-session deadline, count
caps; a session that misses its deadline is a hang.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from bench.context import Context
from bench.harness import (
    Row,
    broker_with_workers,
    fd_count,
    nofile_limit,
    raise_nofile,
    vm_rss_kib,
)
from bench.wire import Api, Exec, drain, start_exec

NAME = "sessions"
TITLE = "5 concurrent sessions (cat)"
LEVELS = (10, 100, 1000, 10_000)
QUICK_LEVELS = (10, 100, 1000)
BUDGET = {"quick": 100, "full": 900}  # seconds: 10,000 sessions take a few minutes to open and close
CHUNK = 16 << 10
WINDOW = 64 << 10
SETUP_PARALLEL = 32
BROKER_FDS = 8  # a `cat` session's fds in the process that runs it: 7 (3 websockets, 3 pipe ends, the spawn
                # connection), and 1 of headroom (connections spread by load, not exactly evenly)
CLIENT_FDS = 4  # ... and in a bench client process: its 3 websockets, and 1 of headroom
FD_RESERVE = 1500  # of each process's limit, for everything else it holds
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


async def _open(api: Api, s: Session, gate: asyncio.Semaphore) -> None:
    async with gate:
        try:
            s.ex = await start_exec(api, "c1", ["cat"])
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            s.error = f"open: {type(exc).__name__}: {exc}"


async def _stream(s: Session, stop_at: float, wait: bool) -> None:
    """``wait``: the exit code from the operation's ``/wait``, in place before the stream starts (a client
    this busy could otherwise ask only after the finished operation was let go: Incus keeps it 5 s).
    Without: the caller checks it in the audit records (``_audited``), as a level of 10,000 sessions
    does: a wait each is 10,000 more connections, and past ~35,000 at once on this machine fresh
    connections were cut (EPIPE) while the 30,000 websockets of the same sessions were not."""
    assert s.ex is not None
    ws0, ws1 = s.ex.ws["0"], s.ex.ws["1"]
    waiting = [asyncio.ensure_future(s.ex.wait(120))] if wait else []

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

    try:
        await asyncio.gather(send(), receive(), drain(s.ex.ws["2"]))
        op = await waiting[0] if waiting else {"metadata": {"return": 0}}  # else checked in the audit
    finally:
        for fut in waiting:
            fut.cancel()
    s.returned = (op.get("metadata") or {}).get("return")
    if s.received != s.sent:
        raise RuntimeError(f"sent {s.sent} bytes, got back {s.received}")
    if s.returned != 0:
        raise RuntimeError(f"return {s.returned} {op.get('err')}")


async def _run_session(s: Session, stop_at: float, deadline: float, wait: bool) -> None:
    if s.ex is None:
        return
    try:
        await asyncio.wait_for(_stream(s, stop_at, wait), max(1.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        s.hung = True
        s.error = f"no end within the deadline (sent {s.sent}, received {s.received})"
    except (ConnectionClosed, Exception) as exc:  # noqa: BLE001 - counted as a failure
        s.error = s.error or f"{type(exc).__name__}: {exc}{await _why(s.ex)}"
    finally:
        s.ex.abort()


async def _why(ex: Exec) -> str:
    """What the operation of a failed session says of itself, if it can still be asked."""
    try:
        op = await asyncio.wait_for(ex.api.get(f"/1.0/operations/{ex.op_id}"), 5)
    except Exception as exc:  # noqa: BLE001 - only a diagnostic
        return f" (operation: {type(exc).__name__})"
    return f" (operation {op.get('status')}: {op.get('err') or (op.get('metadata') or {}).get('return')})"


async def open_all(api: Api, sessions: list[Session]) -> float:
    """Open every session (at most SETUP_PARALLEL at a time); the seconds it took."""
    gate = asyncio.Semaphore(SETUP_PARALLEL)
    t_open = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(_open(api, s, gate) for s in sessions)), 60 + len(sessions) * 0.1)
    return time.monotonic() - t_open


async def stream_all(sessions: list[Session], stream_s: float, total: int, wait: bool = True) -> float:
    """Every opened session streams for ``stream_s``, then ends; the seconds it took."""
    stop_at = time.monotonic() + stream_s
    deadline = stop_at + 30 + total * 0.02
    t0 = time.monotonic()
    await asyncio.gather(*(_run_session(s, stop_at, deadline, wait) for s in sessions))
    return time.monotonic() - t0


def outcome(sessions: list[Session]) -> dict[str, Any]:
    failures = [s for s in sessions if s.error]
    kinds: dict[str, int] = {}
    for s in failures:
        kind = s.error.split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"opened": sum(1 for s in sessions if s.ex is not None), "failures": len(failures),
            "hangs": sum(1 for s in sessions if s.hung), "errors": sorted({s.error for s in failures})[:5],
            "error_kinds": kinds, "bytes": sum(s.received for s in sessions),
            "ops": [s.ex.op_id for s in sessions if s.ex is not None and not s.error]}


class _Sampler:
    """The front end's RSS (summed over its processes) and its largest process's fd count, sampled."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = {"rss": self.rss(), "fds": self.fds()}
        self._task: asyncio.Future[None] | None = None

    def rss(self) -> int:
        return sum(vm_rss_kib(pid) for pid in self.pids)

    def fds(self) -> int:
        return max(fd_count(pid) for pid in self.pids)

    def sample(self) -> None:
        self.peak["rss"] = max(self.peak["rss"], self.rss())
        self.peak["fds"] = max(self.peak["fds"], self.fds())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.sample()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def level(api: Api, pids: list[int], n: int, stream_s: float, clients: int = 1) -> dict[str, object]:
    """One level against the front end ``pids`` (the agent first): in this process (``clients`` 1) or split
    over ``clients`` child processes, each its share of the sessions."""
    await asyncio.sleep(0.5)
    rss_before, fds_before = sum(vm_rss_kib(pid) for pid in pids), max(fd_count(pid) for pid in pids)
    sampler = _Sampler(pids)
    if clients == 1:
        sessions = [Session(i) for i in range(n)]
        open_s = await open_all(api, sessions)
        sampler.sample()
        sampler.start()
        try:
            elapsed = await stream_all(sessions, stream_s, n)
        finally:
            sampler.stop()
        r = outcome(sessions)
        r.pop("ops")
    else:
        r, open_s, elapsed = await _in_children(api.socket_path, n, stream_s, clients, sampler)
    # After: past the operations' 5 s retention at the top level, so what stays is not just kept records.
    await asyncio.sleep(6.0 if n >= 1000 else 1.0)
    rss_after, fds_after = sum(vm_rss_kib(pid) for pid in pids), max(fd_count(pid) for pid in pids)
    return {
        "n": n, "open_s": open_s, "stream_s": stream_s, "elapsed_s": elapsed, **r,
        "mib_s": int(r["bytes"]) / (1 << 20) / elapsed, "processes": len(pids), "client_processes": clients,
        "rss_before_kib": rss_before, "rss_peak_kib": sampler.peak["rss"], "rss_after_kib": rss_after,
        "growth_per_session_kib": (sampler.peak["rss"] - rss_before) / n,
        "agent_fds": {"before": fds_before, "peak": sampler.peak["fds"], "after": fds_after},
    }


async def _in_children(socket: str, n: int, stream_s: float, clients: int,
                       sampler: _Sampler) -> tuple[dict[str, Any], float, float]:
    """The sessions split over ``clients`` processes (``child``): each opens its
    share and says so; once all have, they stream together and report."""
    shares = [range(i * n // clients, (i + 1) * n // clients) for i in range(clients)]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from bench.workloads.sessions import child; child(sys.argv[1:])",
        socket, str(share.start), str(len(share)), str(stream_s), str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24) for share in shares]
    try:
        t_open = time.monotonic()
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120 + n * 0.1)
            if not line.startswith(b"opened"):
                raise RuntimeError(f"a client process did not open its sessions: {line[:200]!r}")
        open_s = time.monotonic() - t_open
        sampler.sample()
        sampler.start()
        t0 = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        parts = []
        for proc in procs:
            assert proc.stdout is not None
            parts.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), stream_s + 120 + n * 0.05)))
        elapsed = time.monotonic() - t0
    finally:
        sampler.stop()
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    audit_failures = await _audited(socket, [op for p in parts for op in p["ops"]])
    merged = {"opened": sum(p["opened"] for p in parts),
              "failures": sum(p["failures"] for p in parts) + audit_failures,
              "audit_failures": audit_failures,
              "hangs": sum(p["hangs"] for p in parts), "bytes": sum(p["bytes"] for p in parts),
              "errors": sorted({e for p in parts for e in p["errors"]})[:5],
              "error_kinds": {k: sum(p["error_kinds"].get(k, 0) for p in parts)
                              for k in {k for p in parts for k in p["error_kinds"]}}}
    return merged, open_s, elapsed


async def _audited(socket: str, op_ids: list[str]) -> int:
    """How many of these execs the audit log (``GET /1.0/audit``, exec_audit) does not show ended with
    Success and return 0."""
    api = Api(socket)
    try:
        records = await api.get(f"/1.0/audit?limit={min(10_000, len(op_ids) + 1000)}")
    finally:
        await api.aclose()
    ok = {r["operation"] for r in records if r.get("status") == "Success" and r.get("return") == 0}
    return sum(1 for op in op_ids if op not in ok)


async def _child(socket: str, start: int, count: int, stream_s: float, total: int) -> None:
    """A client process's share: open, say so, wait for "go", stream, print the outcome as JSON."""
    raise_nofile()
    api = Api(socket, pool=False)  # each session's POST free to land on any front-end process
    sessions = [Session(i) for i in range(start, start + count)]
    await open_all(api, sessions)
    print("opened", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await stream_all(sessions, stream_s, total, wait=False)
    print(json.dumps(outcome(sessions)), flush=True)
    await api.aclose()


def _processes(n: int, fds_each: int, limit: int) -> int:
    return max(1, math.ceil(n * fds_each / max(limit - FD_RESERVE, fds_each)))


async def _dedicated(n: int, stream_s: float, hard: int) -> dict[str, object]:
    """A level past one process's fd limit: a broker of its own with enough worker processes (one more
    than the limit asks for: connections spread by load, not exactly evenly), clients likewise."""
    processes = _processes(n, BROKER_FDS, hard) + 1
    clients = _processes(n, CLIENT_FDS, hard) + 1
    async with broker_with_workers(processes) as (_broker, api, pids):
        # every `cat` is a process of c1: past the default pids limit (an eighth of pid_max) as a user would
        await api.call("PATCH", "/1.0/instances/c1", {"config": {"limits.processes": str(n + 1000)}})
        return await level(api, pids, n, stream_s, clients)


async def run(ctx: Context) -> list[Row]:
    """Each level's throughput and front-end RSS growth per session; the top level's RSS row carries the
    check of its sessions (byte-exact, none hung): its KiB target is bench/targets.py's."""
    assert ctx.api is not None
    soft, hard = raise_nofile()
    agent_limit = nofile_limit(ctx.agent_pid)
    stream_s = ctx.seconds(2, 8)
    levels = QUICK_LEVELS if ctx.quick else LEVELS
    rows = []
    for n in levels:
        if BROKER_FDS * n + FD_RESERVE <= hard and CLIENT_FDS * n + FD_RESERVE <= soft:
            r = await level(ctx.api, [ctx.agent_pid], n, stream_s)
        else:
            r = await _dedicated(n, stream_s, hard)
        ok = r["failures"] == 0 and r["hangs"] == 0 and r["opened"] == n
        growth = float(r["growth_per_session_kib"])  # type: ignore[arg-type]
        note = (f"{r['failures']} failed, {r['hangs']} hung, {r['opened']}/{n} opened in {r['open_s']:.1f}s; "
                f"RSS {r['rss_before_kib'] // 1024}->{r['rss_peak_kib'] // 1024}->{r['rss_after_kib'] // 1024} MiB")
        if r["processes"] != 1:
            note += (f"; {r['processes']} front-end processes (--workers, fd limit {soft}/{hard}), "
                     f"{r['client_processes']} client processes")
        if r["errors"]:
            note += f"; e.g. {r['errors'][0]}"
        row = Row(TITLE, f"{n} sessions: throughput", r["mib_s"], "MiB/s", note=note, extra=r)  # type: ignore[arg-type]
        rows.append(row)
        rows.append(Row(TITLE, f"{n} sessions: RSS growth/session", growth, "KiB",
                        met=ok if n == levels[-1] else None,
                        note=f"front-end fds peak {r['agent_fds']['peak']} in one process, limit {agent_limit}"
                             + ("" if ok else "; NOT byte-exact or not all ended")))  # type: ignore[index]
        if not ok and n < levels[-1]:
            rows[-1].note += "; stopped: a smaller level already failed"
            break
    return rows


def child(argv: list[str]) -> None:
    """A client process of a level split over processes (``_in_children``)."""
    sock, first, count, seconds, whole = argv[:5]
    asyncio.run(_child(sock, int(first), int(count), float(seconds), int(whole)))
