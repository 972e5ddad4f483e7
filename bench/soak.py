"""Soak (issue 12, item 4): many mixed execs, 50 at a time, with the real `lxc` client; then counts and a leak
check with numbers. `make soak` (10,000 execs on a 2-node cluster of its own) and cluster_tests/test_soak.py
(a short run on the test session's cluster) both run `soak()` below.

Every exec runs `sh -c 'echo $0; exit K' TOKEN` (K varied, TOKEN unique) in one of three kinds:

- ``websocket``: ``lxc exec -T INSTANCE -- ...`` (non-interactive, stdin /dev/null, stdout captured);
- ``interactive``: ``lxc exec -t INSTANCE -- ...`` on a pseudo-terminal of the driver's (stdin, stdout
  and stderr its slave side, the master read to EOF);
- ``task``: POST exec with wait-for-websocket and record-output false over the unix socket, then /wait;

each on one of the routes: an instance through its owner's socket (local), or through another member's
(forwarded). Every exec has a deadline (exceeded = a hang; the `lxc` process is killed); its exit code is
checked (lxc's status, or the operation's ``return``, and the final event's ``return``), as is its output
(lxc only). Before the first exec an ``/1.0/events?type=operation`` websocket is open on every member (in
a thread of its own, so the exec traffic never starves it); each exec's operation (a task's from the POST,
lxc's found by TOKEN in the events' command) must have its final event (Success or Failure) on every
member's listener: members forward their events to each other, so each listener sees every operation.

Leak check: each member's agent (``server_pid`` of its ``GET /1.0``, a ``ray::NodeAgent`` carrying that
member's EXECBROKER_DIR) is sampled after the first 10 % of the execs (the warm-up: pools, caches, lazily
opened fds) and after the last, each time once the driver's operations have expired (quiescence, with a
deadline): open fds, threads, child processes, VmRSS, and the processes inside each instance. "Flat" is
judged by explicit bounds (``Bounds``): fds, threads, children and instance processes back to the first
sample's counts within a small allowance; RSS growth under both a fraction of the first sample and a
per-exec allowance (a leak of L bytes per exec grows RSS by L times the execs between the samples).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import random
import secrets
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import unix_connect

from bench.harness import raise_nofile, vm_rss_kib
from bench.wire import Api
from node_agent.runtime import cgroups
from node_agent.service import cgroup_parent
from tests.conftest import Endpoint, assert_no_leftovers, members_online, private_base, wait_for

KINDS = ("websocket", "interactive", "task")
FINAL = {"Success", "Failure", "Cancelled"}
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local-cluster.sh"
RESULTS = ROOT / "bench" / "results"


# ---- what runs where -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """Where an exec goes: ``instance`` (owned by member ``owner``) through the socket of member ``via``."""

    instance: str
    owner: str
    via: str

    @property
    def forwarded(self) -> bool:
        return self.via != self.owner

    @property
    def label(self) -> str:
        return f"{self.instance}@{self.owner} via {self.via}" + (" (forwarded)" if self.forwarded else "")


@dataclass
class Bounds:
    """What "flat" means, first sample (after warm-up) to last. Counts may exceed the first sample by at most
    their allowance; RSS may grow by at most ``rss_fraction`` of the first sample AND at most
    ``rss_bytes_per_exec`` times the execs run between the samples (with a floor of ``rss_floor_kib``, the
    allocator's noise on a short run)."""

    fds: int = 4
    threads: int = 2
    children: int = 0
    instance_processes: int = 0
    rss_fraction: float = 0.10
    rss_bytes_per_exec: int = 1024
    rss_floor_kib: int = 4096

    def rss_limit_kib(self, first_kib: int, execs_between: int) -> int:
        per_exec = max(self.rss_floor_kib, execs_between * self.rss_bytes_per_exec // 1024)
        return min(int(first_kib * self.rss_fraction), per_exec)


@dataclass
class Config:
    nodes: dict[str, Path]  # member name -> its data dir (socket = data dir / unix.socket)
    routes: list[Route]
    home: Path  # HOME of the lxc client (its config)
    total: int = 10_000
    concurrency: int = 50
    deadline: float = 60.0  # per exec: a hang is an exec that exceeded it
    warmup_fraction: float = 0.10
    settle_timeout: float = 60.0  # quiescence before a sample; the final events after the last exec
    bounds: Bounds = field(default_factory=Bounds)
    seed: int = 12
    samples: int = 2  # quiescent agent samples: the first after the warm-up, the last at the end
    progress: bool = False

    def socket(self, node: str) -> str:
        return str(self.nodes[node] / "unix.socket")


@dataclass
class Outcome:
    index: int
    kind: str
    route: Route
    token: str
    expected: int
    code: int | None = None
    hung: bool = False
    error: str = ""  # failed to run at all (not a hang, not a wrong code)
    wrong: str = ""  # wrong exit code or output
    op_id: str | None = None
    seconds: float = 0.0


# ---- the events listeners -------------------------------------------------------------------------------

@dataclass
class _Seen:
    final: str | None = None
    ret: int | None = None
    events: int = 0


class EventLog:
    """An operation-events websocket on every member, read by a thread with its own event loop. Per member:
    operation id -> what its events said; and, from any member, TOKEN -> operation id."""

    def __init__(self, sockets: dict[str, str], prefix: str) -> None:
        self.sockets = sockets
        self.prefix = prefix
        self.seen: dict[str, dict[str, _Seen]] = {n: {} for n in sockets}
        self.by_token: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="soak-events", daemon=True)

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("events listeners did not connect")
        if self.errors:
            raise RuntimeError(f"events listeners: {self.errors}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def final(self, node: str, op_id: str) -> _Seen | None:
        with self._lock:
            seen = self.seen[node].get(op_id)
            return seen if seen is not None and seen.final else None

    def op_for(self, token: str) -> str | None:
        with self._lock:
            return self.by_token.get(token)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        conns = {}
        try:
            for node, path in self.sockets.items():
                conns[node] = await unix_connect(path, "ws://eb/1.0/events?type=operation", compression=None,
                                                 max_size=None, ping_interval=None, open_timeout=30,
                                                 close_timeout=2)
        except Exception as exc:  # noqa: BLE001 - reported by start()
            self.errors.append(f"connect: {type(exc).__name__}: {exc}")
        finally:
            self._ready.set()
        readers = [asyncio.ensure_future(self._read(node, ws)) for node, ws in conns.items()]
        try:
            await self._stop.wait()
        finally:
            for ws in conns.values():
                await ws.close()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _read(self, node: str, ws: Any) -> None:
        seen = self.seen[node]
        try:
            async for frame in ws:
                meta = json.loads(frame).get("metadata") or {}
                op_id = meta.get("id")
                if not op_id:
                    continue
                status = meta.get("status")
                inner = meta.get("metadata") or {}
                command = inner.get("command")
                with self._lock:
                    self.counts[node] += 1
                    entry = seen.setdefault(op_id, _Seen())
                    entry.events += 1
                    if status in FINAL:
                        entry.final = status
                        entry.ret = inner.get("return")
                    if (isinstance(command, list) and command and isinstance(command[-1], str)
                            and command[-1].startswith(self.prefix)):
                        self.by_token.setdefault(command[-1], op_id)
        except Exception as exc:  # noqa: BLE001 - reported below
            self.errors.append(f"{node}: listener failed: {type(exc).__name__}: {exc}")
            return
        if not (self._stop is not None and self._stop.is_set()):
            self.errors.append(f"{node}: the server closed the events websocket "
                               f"after {self.counts[node]} events (code {ws.close_code})")


# ---- one exec --------------------------------------------------------------------------------------------

def _script(token: str, code: int) -> list[str]:
    return ["sh", "-c", f"echo $0; exit {code}", token]


def _lxc_env(cfg: Config, via: str) -> dict[str, str]:
    return {**os.environ, "LXD_DIR": str(cfg.nodes[via]), "HOME": str(cfg.home)}


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


async def _lxc_websocket(cfg: Config, o: Outcome) -> None:
    argv = ["lxc", "exec", "-T", o.route.instance, "--", *_script(o.token, o.expected)]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=_lxc_env(cfg, o.route.via))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), cfg.deadline)
    except asyncio.TimeoutError:
        o.hung = True
        await _kill(proc)
        return
    o.code = proc.returncode
    if o.code != o.expected:
        o.wrong = f"lxc exit {o.code}, want {o.expected}; stderr {err[-200:]!r}"
    elif out != f"{o.token}\n".encode():
        o.wrong = f"stdout {out[-200:]!r}, want {o.token!r}; stderr {err[-200:]!r}"


async def _lxc_interactive(cfg: Config, o: Outcome) -> None:
    """``lxc exec -t`` with stdin, stdout and stderr on a PTY of ours; the master read until the slave side is
    closed everywhere (EIO), within the deadline."""
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.set_blocking(master, False)
    out = bytearray()
    eof = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: no slave left open
            data = b""
        if data:
            out.extend(data)
        else:
            loop.remove_reader(master)
            if not eof.done():
                eof.set_result(None)

    try:
        argv = ["lxc", "exec", "-t", o.route.instance, "--", *_script(o.token, o.expected)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, env=_lxc_env(cfg, o.route.via),
                start_new_session=True)
        finally:
            os.close(slave)
        loop.add_reader(master, readable)
        try:
            await asyncio.wait_for(asyncio.gather(proc.wait(), asyncio.shield(eof)), cfg.deadline)
        except asyncio.TimeoutError:
            o.hung = True
            await _kill(proc)
            return
    finally:
        loop.remove_reader(master)
        os.close(master)
    o.code = proc.returncode
    if o.code != o.expected:
        o.wrong = f"lxc -t exit {o.code}, want {o.expected}; terminal {bytes(out[-200:])!r}"
    elif f"{o.token}\r\n".encode() not in out:
        o.wrong = f"terminal {bytes(out[-200:])!r} lacks {o.token!r}"


async def _task(cfg: Config, apis: dict[str, Api], o: Outcome) -> None:
    api = apis[o.route.via]
    body = {"command": _script(o.token, o.expected), "wait-for-websocket": False, "record-output": False,
            "interactive": False}
    started = time.monotonic()
    try:
        doc = await asyncio.wait_for(api.call("POST", f"/1.0/instances/{o.route.instance}/exec", body),
                                     cfg.deadline)
        o.op_id = doc["metadata"]["id"]
        left = max(1, int(cfg.deadline - (time.monotonic() - started)))
        op = await asyncio.wait_for(api.wait(o.op_id, left), left + 5)
    except asyncio.TimeoutError:
        o.hung = True
        return
    if op.get("status") not in FINAL:  # /wait returned at its timeout with the operation still running
        o.hung = True
        return
    o.code = (op.get("metadata") or {}).get("return")
    if o.code != o.expected or op.get("status") != "Success":
        o.wrong = f"task {op.get('status')} return {o.code}, want {o.expected}; err {op.get('err')!r}"


async def run_one(cfg: Config, apis: dict[str, Api], o: Outcome) -> Outcome:
    t0 = time.monotonic()
    try:
        if o.kind == "task":
            await _task(cfg, apis, o)
        elif o.kind == "interactive":
            await _lxc_interactive(cfg, o)
        else:
            await _lxc_websocket(cfg, o)
    except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
        o.error = f"{type(exc).__name__}: {exc}"[:300]
    o.seconds = time.monotonic() - t0
    return o


def schedule(cfg: Config, prefix: str) -> list[Outcome]:
    """Every kind on every route in equal shares, shuffled (seeded): kinds and routes run side by side."""
    combos = [(k, r) for r in cfg.routes for k in KINDS]
    plan = [Outcome(i, *combos[i % len(combos)], token=f"{prefix}{i}", expected=(i * 37) % 126)
            for i in range(cfg.total)]
    random.Random(cfg.seed).shuffle(plan)
    return plan


async def run_batch(cfg: Config, apis: dict[str, Api], batch: list[Outcome], done_before: int) -> None:
    slots = asyncio.Semaphore(cfg.concurrency)
    finished = done_before
    last_print = time.monotonic()

    async def one(o: Outcome) -> None:
        nonlocal finished, last_print
        async with slots:
            await run_one(cfg, apis, o)
        finished += 1
        if cfg.progress and (time.monotonic() - last_print > 10 or finished == cfg.total):
            last_print = time.monotonic()
            print(f"soak: {finished}/{cfg.total} execs", file=sys.stderr, flush=True)

    await asyncio.gather(*(one(o) for o in batch))


# ---- the leak samples -----------------------------------------------------------------------------------

@dataclass
class Sample:
    pid: int
    fds: int
    threads: int
    children: int
    rss_kib: int
    instance_processes: dict[str, int]
    at_exec: int

    def row(self) -> dict[str, Any]:
        return asdict(self)


def children_of(pid: int) -> int:
    """Live (not zombie) processes whose parent is ``pid``."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            n += 1
    return n


async def agent_pid(api: Api, data_dir: Path) -> int:
    """The member's agent: the API's server_pid, checked to be the ``ray::NodeAgent`` of that data dir."""
    pid = int((await api.get("/1.0"))["environment"]["server_pid"])
    check_agent(pid, data_dir)
    return pid


def check_agent(pid: int, data_dir: Path) -> None:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    if b"NodeAgent" not in cmd or f"EXECBROKER_DIR={data_dir}".encode() not in environ:
        raise RuntimeError(f"pid {pid} is not the agent of {data_dir}: {cmd[:80]!r}")


async def sample(cfg: Config, apis: dict[str, Api], pids: dict[str, int], at_exec: int) -> dict[str, Sample]:
    out = {}
    for node, pid in pids.items():
        if not os.path.exists(f"/proc/{pid}"):
            raise RuntimeError(f"the agent of {node} (pid {pid}) is gone")
        procs = {}
        for r in cfg.routes:
            if r.owner == node and r.instance not in procs:
                state = await apis[node].get(f"/1.0/instances/{r.instance}/state")
                procs[r.instance] = int(state["processes"])
        out[node] = Sample(pid, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")),
                           children_of(pid), vm_rss_kib(pid), procs, at_exec)
    return out


async def our_operations(apis: dict[str, Api], ours: set[str]) -> set[str]:
    """Which of the driver's operations any member still lists (running, or finished and not yet expired)."""
    listed: set[str] = set()
    for api in apis.values():
        doc = await api.get("/1.0/operations?recursion=1")
        for ops in (doc or {}).values():
            listed.update(op["id"] for op in ops if isinstance(op, dict))
    return listed & ours


async def wait_until(cond: Any, timeout: float, interval: float = 0.25) -> bool:
    """Poll the async ``cond`` until true or the deadline; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if await cond():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


def _counts(s: Sample) -> tuple[int, ...]:
    return (s.fds, s.threads, s.children, *s.instance_processes.values())


async def settled_sample(cfg: Config, apis: dict[str, Api], pids: dict[str, int], ours: set[str],
                         at_exec: int, first: dict[str, Sample] | None
                         ) -> tuple[dict[str, Sample], list[str]]:
    """A sample at quiescence: none of our operations listed any more (all expired), then (first sample) two
    reads 0.25 s apart with the same counts, or (last sample) counts within the bounds of the first; each
    with a deadline, after which the sample is taken as it is and the problem said."""
    notes = []
    if not await wait_until(lambda: _none_left(apis, ours), cfg.settle_timeout):
        notes.append(f"operations still listed after {cfg.settle_timeout:g}s: "
                     f"{len(await our_operations(apis, ours))}")
    prev: list[dict[str, Sample]] = []

    async def steady() -> bool:
        now = await sample(cfg, apis, pids, at_exec)
        if first is not None:
            prev[:] = [now]
            return not judge_counts(cfg.bounds, first, now)
        stable = bool(prev) and all(_counts(prev[-1][n]) == _counts(now[n]) for n in now)
        prev[:] = [now]
        return stable

    if not await wait_until(steady, cfg.settle_timeout):
        notes.append(f"counts did not settle within {cfg.settle_timeout:g}s")
    return prev[-1], notes


async def _none_left(apis: dict[str, Api], ours: set[str]) -> bool:
    return not await our_operations(apis, ours)


def judge_counts(b: Bounds, first: dict[str, Sample], last: dict[str, Sample]) -> list[str]:
    problems = []
    for node, f in first.items():
        s = last[node]
        for name, allow in (("fds", b.fds), ("threads", b.threads), ("children", b.children)):
            if getattr(s, name) > getattr(f, name) + allow:
                problems.append(f"{node} {name} {getattr(f, name)} -> {getattr(s, name)} (allowed +{allow})")
        for inst, n in s.instance_processes.items():
            if n > f.instance_processes.get(inst, 0) + b.instance_processes:
                problems.append(f"{node} instance {inst} processes {f.instance_processes.get(inst)} -> {n}")
        if s.pid != f.pid:
            problems.append(f"{node} agent pid changed {f.pid} -> {s.pid} (restarted)")
    return problems


def judge_rss(b: Bounds, first: dict[str, Sample], last: dict[str, Sample]) -> list[str]:
    problems = []
    for node, f in first.items():
        s = last[node]
        limit = b.rss_limit_kib(f.rss_kib, s.at_exec - f.at_exec)
        if s.rss_kib - f.rss_kib > limit:
            problems.append(f"{node} RSS {f.rss_kib} -> {s.rss_kib} KiB (+{s.rss_kib - f.rss_kib}, "
                            f"allowed +{limit})")
    return problems


# ---- the whole soak ----------------------------------------------------------------------------------------

@dataclass
class Report:
    total: int
    concurrency: int
    duration_s: float  # running execs (the pauses for the samples not counted)
    by_kind: dict[str, int]
    kinds: dict[str, tuple[float, float, float]]  # kind and route -> p50, p99, max seconds
    hangs: list[Outcome]
    wrong: list[Outcome]
    errors: list[Outcome]
    lost: dict[str, list[str]]  # member -> tokens whose operation's final event it did not deliver
    event_errors: list[str]
    samples: list[dict[str, Sample]]  # member -> agent sample, at each checkpoint (first: after the warm-up)
    leak_problems: list[str]
    settle_notes: list[str]
    bounds: Bounds

    @property
    def first(self) -> dict[str, Sample]:
        return self.samples[0]

    @property
    def last(self) -> dict[str, Sample]:
        return self.samples[-1]

    @property
    def lost_count(self) -> int:
        return len({t for tokens in self.lost.values() for t in tokens})

    @property
    def ok(self) -> bool:
        return not (self.hangs or self.wrong or self.errors or self.lost_count or self.event_errors
                    or self.leak_problems or self.settle_notes)

    def failures(self) -> list[str]:
        out = [f"hang: {o.kind} {o.route.label} {o.token}" for o in self.hangs[:10]]
        out += [f"wrong: {o.kind} {o.route.label} {o.token}: {o.wrong}" for o in self.wrong[:10]]
        out += [f"error: {o.kind} {o.route.label} {o.token}: {o.error}" for o in self.errors[:10]]
        out += [f"lost final event on {n} ({len(t)}): {', '.join(t[:10])}" for n, t in self.lost.items() if t]
        out += [f"events: {e}" for e in self.event_errors]
        out += [f"leak: {p}" for p in self.leak_problems]
        out += [f"settle: {n}" for n in self.settle_notes]
        return out

    def rss_slope(self, node: str) -> float | None:
        """Least-squares RSS growth of ``node``'s agent over the samples, KiB per 1,000 execs."""
        pts = [(s[node].at_exec, s[node].rss_kib) for s in self.samples]
        if len(pts) < 3:
            return None
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        den = sum((x - mx) ** 2 for x, _ in pts)
        return sum((x - mx) * (y - my) for x, y in pts) / den * 1000 if den else None

    def table(self) -> str:
        b = self.bounds
        lines = [(f"soak: {self.total} execs, {self.concurrency} at a time, {self.duration_s:.1f} s of execs "
                  f"({self.total / self.duration_s:.1f}/s)"), "",
                 f"  {'kind        route':<48} {'execs':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7}"]
        for key, n in sorted(self.by_kind.items()):
            p50, p99, top = self.kinds[key]
            lines.append(f"  {key:<48} {n:>6} {p50:>7.2f} {p99:>7.2f} {top:>7.2f}")
        lines += ["", f"  {'hangs (deadline exceeded)':<48} {len(self.hangs):>6}",
                  f"  {'lost final events (on any member)':<48} {self.lost_count:>6}",
                  f"  {'wrong exit codes (or output)':<48} {len(self.wrong):>6}",
                  f"  {'failed to run':<48} {len(self.errors):>6}",
                  f"  {'events listener problems':<48} {len(self.event_errors):>6}",
                  f"  {'quiescence not reached (ops listed, counts)':<48} {len(self.settle_notes):>6}"]
        head = ("member", "figure", "first", "last", "delta", "bound", "verdict")
        body = []
        for node, f in self.first.items():
            s = self.last[node]
            rss_limit = b.rss_limit_kib(f.rss_kib, s.at_exec - f.at_exec)
            rows = [("fds", f.fds, s.fds, b.fds), ("threads", f.threads, s.threads, b.threads),
                    ("children", f.children, s.children, b.children)]
            rows += [(f"processes in {i}", f.instance_processes.get(i, 0), n, b.instance_processes)
                     for i, n in s.instance_processes.items()]
            for name, a, z, allow in rows:
                body.append((node, name, str(a), str(z), f"{z - a:+d}", f"<= +{allow}",
                             "flat" if z - a <= allow else "LEAK"))
            d = s.rss_kib - f.rss_kib
            body.append((node, "RSS KiB", str(f.rss_kib), str(s.rss_kib), f"{d:+d}", f"<= +{rss_limit}",
                         "flat" if d <= rss_limit else "LEAK"))
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

        def fmt(r: tuple[str, ...]) -> str:
            return "  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

        first_at = max(s.at_exec for s in self.first.values())
        last_at = max(s.at_exec for s in self.last.values())
        lines += ["", (f"leak check: each agent after exec {first_at} (end of warm-up) and {last_at}, at "
                       f"quiescence; RSS bound min({b.rss_fraction:.0%} of first, max({b.rss_floor_kib} KiB, "
                       f"{b.rss_bytes_per_exec} B x execs between))"),
                  fmt(head), "  " + "-+-".join("-" * w for w in widths), *(fmt(r) for r in body)]
        if len(self.samples) > 2:
            lines += ["", "trend (quiescent samples: after exec N, fds/threads/children RSS KiB):"]
            for node in self.first:
                trail = "  ".join(f"{s[node].at_exec}:{s[node].fds}/{s[node].threads}/{s[node].children} "
                                  f"{s[node].rss_kib}" for s in self.samples)
                lines.append(f"  {node}: {trail}")
                slope = self.rss_slope(node)
                if slope is not None:
                    lines.append(f"  {node}: RSS slope {slope:+.0f} KiB per 1,000 execs (least squares)")
        lines += ["", "verdict: " + ("PASS" if self.ok else "FAIL")]
        lines += [f"  {p}" for p in self.failures()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "concurrency": self.concurrency, "duration_s": self.duration_s,
                "by_kind": self.by_kind, "latency_s": self.kinds, "hangs": len(self.hangs),
                "wrong": len(self.wrong), "errors": len(self.errors), "lost_final_events": self.lost_count,
                "lost_by_member": {n: len(t) for n, t in self.lost.items()},
                "event_errors": self.event_errors,
                "samples": [{n: s.row() for n, s in taken.items()} for taken in self.samples],
                "bounds": asdict(self.bounds), "leak_problems": self.leak_problems,
                "settle_notes": self.settle_notes, "ok": self.ok, "failures": self.failures()}


async def soak(cfg: Config) -> Report:
    """Run ``cfg.total`` execs against a running cluster and judge them (see the module's docstring)."""
    prefix = f"soak-{secrets.token_hex(3)}-"
    apis = {node: Api(cfg.socket(node)) for node in cfg.nodes}
    events = EventLog({node: cfg.socket(node) for node in cfg.nodes}, prefix)
    try:
        pids = {node: await agent_pid(apis[node], cfg.nodes[node]) for node in cfg.nodes}
        await asyncio.to_thread(events.start)
        plan = schedule(cfg, prefix)
        marks = checkpoints(cfg)
        samples: list[dict[str, Sample]] = []
        notes: list[str] = []
        duration, done = 0.0, 0
        for mark in marks:
            t0 = time.monotonic()
            await run_batch(cfg, apis, plan[done:mark], done)
            duration += time.monotonic() - t0
            done = mark
            last_one = mark == marks[-1]
            lost = await _final_events(cfg, events, plan) if last_one else {}
            taken, why = await settled_sample(cfg, apis, pids, _op_ids(plan[:mark], events), mark,
                                              samples[0] if last_one else None)
            samples.append(taken)
            notes += why
    finally:
        events.stop()
        for api in apis.values():
            await api.aclose()
    for o in plan:  # the final events' return must agree with what the client got
        if o.code is not None and not o.wrong and o.op_id:
            for node in cfg.nodes:
                seen = events.final(node, o.op_id)
                if seen is not None and (seen.ret != o.expected or seen.final != "Success"):
                    o.wrong = (f"{node}'s final event: {seen.final}, return {seen.ret}; "
                               f"want Success, {o.expected}")
    by_kind = Counter(f"{o.kind:<11} {o.route.label}" for o in plan)
    return Report(
        total=cfg.total, concurrency=cfg.concurrency, duration_s=duration, by_kind=dict(by_kind),
        hangs=[o for o in plan if o.hung], wrong=[o for o in plan if o.wrong],
        errors=[o for o in plan if o.error], lost=lost, event_errors=list(events.errors), samples=samples,
        leak_problems=judge_counts(cfg.bounds, samples[0], samples[-1]) + judge_rss(cfg.bounds, samples[0],
                                                                                      samples[-1]),
        settle_notes=notes, kinds=_latency_by_kind(plan), bounds=cfg.bounds)


def checkpoints(cfg: Config) -> list[int]:
    """After how many execs the agents are sampled: the end of the warm-up, then evenly to the end."""
    first = max(1, int(cfg.total * cfg.warmup_fraction))
    n = max(2, cfg.samples)
    marks = [first + (cfg.total - first) * k // (n - 1) for k in range(n)]
    return sorted(set(marks))


def _latency_by_kind(plan: list[Outcome]) -> dict[str, tuple[float, float, float]]:
    """Per kind and route: p50, p99 and max seconds."""
    groups: dict[str, list[float]] = {}
    for o in plan:
        groups.setdefault(f"{o.kind:<11} {o.route.label}", []).append(o.seconds)
    out = {}
    for key, values in groups.items():
        values.sort()
        p99 = values[min(len(values) - 1, len(values) * 99 // 100)]
        out[key] = (values[len(values) // 2], p99, values[-1])
    return out


def _op_ids(plan: list[Outcome], events: EventLog) -> set[str]:
    for o in plan:
        if o.op_id is None:
            o.op_id = events.op_for(o.token)
    return {o.op_id for o in plan if o.op_id}


async def _final_events(cfg: Config, events: EventLog, plan: list[Outcome]) -> dict[str, list[str]]:
    """Wait (deadline ``settle_timeout``) for every started exec's final event on every member; then the
    tokens still missing one, per member. An exec whose operation no event ever named is lost everywhere."""
    started = [o for o in plan if not o.error or o.op_id]

    def missing() -> dict[str, list[str]]:
        _op_ids(started, events)
        return {node: [o.token for o in started if o.op_id is None or events.final(node, o.op_id) is None]
                for node in cfg.nodes}

    async def complete() -> bool:
        return not any(missing().values())

    await wait_until(complete, cfg.settle_timeout)
    return missing()


# ---- a 2-node cluster of its own (make soak) ---------------------------------------------------------------

class SoakCluster:
    """deploy/local-cluster.sh up 2 BASE in a private temp dir, instance sa on node1 and sb on node2; stop()
    deletes them through the API, brings the nodes down and checks nothing of BASE is left."""

    def __init__(self, nodes: int = 2) -> None:
        self.n = nodes
        self.base = private_base("ebsoak-")
        (self.base / "home").mkdir()
        self.env = {**os.environ, "RAY_TMPDIR": str(self.base / "ray"), "EXECBROKER_DEFAULT_INSTANCE": ""}
        self.instances = {"sa": "node1", "sb": "node2"}

    def node(self, k: int) -> Endpoint:
        return Endpoint(base=self.base, data_dir=self.base / f"node{k}")

    def script(self, *args: str, timeout: float = 300) -> None:
        r = subprocess.run(["sh", str(SCRIPT), *args, str(self.base)], env=self.env, capture_output=True,
                           text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"local-cluster.sh {args}: {r.stdout}\n{r.stderr}")

    def start(self) -> None:
        self.script("up", str(self.n))
        wait_for(lambda: members_online(self.node(1), self.n), 60, f"{self.n} members online")
        for name, target in self.instances.items():
            self.node(1).launch(name, target=target)

    def config(self, **kw: Any) -> Config:
        nodes = {f"node{k}": self.base / f"node{k}" for k in range(1, self.n + 1)}
        routes = [Route("sa", "node1", "node1"), Route("sb", "node2", "node2"), Route("sb", "node2", "node1")]
        return Config(nodes=nodes, routes=routes, home=self.base / "home", **kw)

    def stop(self) -> list[str]:
        """Everything started goes; returns what was not clean (instances not deleted, processes or cgroups
        left, which are killed and removed all the same)."""
        problems = []
        try:
            for name in self.instances:
                try:
                    self.node(1).remove(name)
                except Exception as exc:  # noqa: BLE001 - said, and the nodes still go down
                    problems.append(f"delete {name}: {type(exc).__name__}: {exc}")
        finally:
            subprocess.run(["sh", str(SCRIPT), "down", str(self.base)], env=self.env, capture_output=True,
                           timeout=300, check=False)
            try:
                assert_no_leftovers(self.base, 60)  # kills what is left, then says so
            except AssertionError as exc:
                problems.append(str(exc)[:500])
                left = [g for k in range(1, self.n + 1)
                        for g in cgroups.remove_tree(cgroup_parent(self.base / f"node{k}"))]
                if left:
                    problems.append(f"cgroups still holding processes: {left}")
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--execs", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--deadline", type=float, default=60.0, help="seconds per exec before it counts as a hang")
    p.add_argument("--samples", type=int, default=10,
                   help="quiescent agent samples, from the warm-up's end to the end")
    p.add_argument("--rss-bytes-per-exec", type=int, default=Bounds.rss_bytes_per_exec,
                   help="RSS growth allowed per exec between the first and last samples")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    p.add_argument("--json", type=Path, default=RESULTS / f"soak-{stamp}.json",
                   help="where the report goes as JSON (default bench/results/soak-<UTC stamp>.json)")
    args = p.parse_args(argv)
    raise_nofile()  # 50 lxc clients and their pipes and PTYs
    cluster = SoakCluster()
    t0 = time.monotonic()
    report, failure, teardown = None, "", []
    try:
        print(f"soak: starting 2 nodes under {cluster.base} ...", file=sys.stderr, flush=True)
        cluster.start()
        print(f"soak: cluster up in {time.monotonic() - t0:.1f}s; {args.execs} execs ...", file=sys.stderr,
              flush=True)
        cfg = cluster.config(total=args.execs, concurrency=args.concurrency, deadline=args.deadline,
                             samples=args.samples, bounds=Bounds(rss_bytes_per_exec=args.rss_bytes_per_exec),
                             progress=True)
        report = asyncio.run(soak(cfg))
    except Exception as exc:  # noqa: BLE001 - said after the teardown
        failure = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        teardown = cluster.stop()
    if report is not None:
        print(report.table())
    if failure:
        print(f"soak: FAILED: {failure}", file=sys.stderr)
    if teardown:
        print("soak: teardown not clean:\n  " + "\n  ".join(teardown), file=sys.stderr)
    print(f"\nsoak: {time.monotonic() - t0:.0f}s in all (cluster up and down included); report: {args.json}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"stamp": args.json.stem, **(report.to_json() if report else {"ok": False}), "failure": failure,
           "teardown": teardown, "table": report.table() if report else ""}
    args.json.write_text(json.dumps(doc, indent=1))
    return 0 if report is not None and report.ok and not teardown else 1


if __name__ == "__main__":
    sys.exit(main())
