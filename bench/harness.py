"""Benchmark plumbing: the broker under test (its own `execbroker up` in a temp dir), process checks,
statistics and the result rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.wire import Api, run_exec
from node_agent.runtime import cgroups
from node_agent.service import cgroup_parent

# The test suite's leak check (command line or environment mentions a path): Ray renames its workers.
from tests.conftest import processes_mentioning

BIN = Path(sys.executable).parent
READY_TIMEOUT = 180.0


# ---- results ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table: a figure, the baseline measured in the same run, and the target verdict."""

    workload: str
    metric: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None  # value / baseline unless the workload says otherwise
    target: str = ""
    met: bool | None = None  # None: no target, or not measurable
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank-interpolated percentile (p in 0..100)."""
    data = sorted(samples)
    if not data:
        raise ValueError("no samples")
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def vs_lxd(title: str, ours: dict[str, float], theirs: Sequence[float] | None, label: str, target_ratio: float,
           anchor_ms: float, why: str, n: int, **extra: Any) -> Row:
    """The "median vs LXD" row, against real LXD measured in the same run (``theirs``). When no LXD answers
    here (``why``) there is no baseline and no verdict: "not measured" (DESIGN §3's anchor figure is only
    quoted in the note, never judged against)."""
    t: dict[str, float] | None = None
    lxd_ms: float | None = None
    if theirs:
        t = summary_ms(theirs)
        lxd_ms = t["p50"]
        note = f"n={n}, interleaved"
    else:
        note = f"not measured: no LXD answering ({why}); DESIGN §3 measured LXD at {anchor_ms:g} ms"
    r = ratio(ours["p50"], lxd_ms)
    return Row(title, "median vs LXD", ours["p50"], "ms", lxd_ms, label, r, f"<= {target_ratio:g}x LXD",
               None if r is None else r <= target_ratio, note, extra={"ours": ours, "lxd": t, **extra})


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    """Seconds in, milliseconds out: p50/p95/p99/min/max and n."""
    return {"p50": percentile(samples, 50) * 1e3, "p95": percentile(samples, 95) * 1e3,
            "p99": percentile(samples, 99) * 1e3, "min": min(samples) * 1e3, "max": max(samples) * 1e3,
            "mean": statistics.fmean(samples) * 1e3, "n": len(samples)}


# ---- processes -------------------------------------------------------------------------------------------

def wait_gone(text: str, timeout: float) -> list[tuple[int, str]]:
    """Wait until no process mentions ``text``; returns the leftovers (empty when clean)."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[tuple[int, bytes]]:
    """The processes whose parent is ``pid``: (pid, command line with its NUL separators)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid:
            found.append((int(entry.name), cmd))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "?"


NOFILE_WANTED = 1 << 18  # 10,000 sessions: ~30,000 websockets here and ~70,000 fds in the agent


def raise_nofile() -> tuple[int, int]:
    """RLIMIT_NOFILE up to the hard limit, and as root the hard limit up to NOFILE_WANTED; the broker the
    bench starts inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < NOFILE_WANTED:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_WANTED, NOFILE_WANTED))
        except (ValueError, OSError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def delete_instances(api: Api) -> list[str]:
    """Stop (force) and delete every instance through the API; returns the errors met."""
    errors = []
    try:
        names = [i["name"] for i in await api.get("/1.0/instances?recursion=1")]
    except Exception as exc:  # noqa: BLE001
        return [f"list instances: {exc}"]
    for name in names:
        try:
            if (await api.get(f"/1.0/instances/{name}"))["status"] != "Stopped":
                await api.finish(await api.call("PUT", f"/1.0/instances/{name}/state",
                                                {"action": "stop", "force": True, "timeout": 30}))
            await api.finish(await api.call("DELETE", f"/1.0/instances/{name}"))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: {exc}")
    return errors


# ---- the broker under test -------------------------------------------------------------------------------

class BrokerProcess:
    """`execbroker up` in a fresh temp dir (EXECBROKER_DIR, RAY_TMPDIR), in its own session."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}  # beside ours, for `up` (EXECBROKER_WORKERS)
        self.base = Path(tempfile.mkdtemp(prefix="ebbench-", dir="/tmp"))
        self.base.chmod(0o711)  # instances' roots (unprivileged host uids) pass through to their rootfs
        self.data_dir = self.base / "data"
        self.home = self.base / "home"  # lxc client config lives here, never in the caller's HOME
        self.home.mkdir()
        self.output: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.ready_s: float | None = None  # Popen -> "serving on"
        self.first_exec_s: float | None = None  # Popen -> first successful exec
        self.stop_s: float | None = None  # SIGTERM -> no process of it left
        self.agent_pid: int | None = None
        self.pid1: int | None = None
        self._ready = threading.Event()

    @property
    def socket(self) -> str:
        return str(self.data_dir / "unix.socket")

    def lxc_env(self) -> dict[str, str]:
        return {**os.environ, "LXD_DIR": str(self.data_dir), "HOME": str(self.home)}

    def start(self) -> None:
        """Popen `execbroker up`, then wait for its "serving on" line."""
        env = {**os.environ, "EXECBROKER_DIR": str(self.data_dir), "RAY_TMPDIR": str(self.base / "ray"),
               "PYTHONUNBUFFERED": "1", **self.env}
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(BIN / "execbroker"), "up"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("execbroker up did not start:\n" + "".join(self.output))
        self.ready_s = time.perf_counter() - self._t0

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "serving on" in line:
                self._ready.set()
        self._ready.set()

    async def first_exec(self, api: Api) -> None:
        """The first successful exec after start (workload 'startup'), then the ids the workloads need."""
        deadline = time.monotonic() + 60
        while True:
            try:
                out = await run_exec(api, "c1", ["true"])
                if out.code == 0:
                    break
                problem: Exception = RuntimeError(f"first exec: return {out.code} {out.err}")
            except Exception as exc:  # noqa: BLE001 - not ready yet
                problem = exc
            if time.monotonic() > deadline:
                raise problem
            await asyncio.sleep(0.01)
        self.first_exec_s = time.perf_counter() - self._t0
        self.agent_pid = int((await api.get("/1.0"))["environment"]["server_pid"])
        self.pid1 = int((await api.get("/1.0/instances/c1/state"))["pid"])

    def stop(self) -> list[tuple[int, str]]:
        """SIGTERM and wait; returns the processes of this broker still alive afterwards (empty when clean)."""
        t0 = time.perf_counter()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()
        left = wait_gone(str(self.base), 30)
        left += [(0, f"cgroup {g}") for g in cgroups.remove_tree(cgroup_parent(self.data_dir))]
        self.stop_s = time.perf_counter() - t0
        return left

    def kill(self) -> None:
        """Last resort, only for the process group this bench started."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def cleanup_dir(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.asynccontextmanager
async def broker_with_workers(processes: int) -> AsyncIterator[tuple[BrokerProcess, Api, list[int]]]:
    """An `execbroker up --workers N` of its own, serving (its first exec done) with all its workers up:
    the broker, a client, and the front end's processes (the agent first). Afterwards its instances are
    deleted through the API and it is stopped; its directory goes when nothing of it is left."""
    broker = BrokerProcess(env={"EXECBROKER_WORKERS": str(processes)})
    api = Api(broker.socket)
    try:
        await asyncio.to_thread(broker.start)
        await broker.first_exec(api)
        assert broker.agent_pid is not None
        deadline = time.monotonic() + 60
        while len(found := sorted(p for p, cmd in children(broker.agent_pid) if b"node_agent.worker" in cmd)) \
                < processes - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{processes - 1} workers did not start")
            await asyncio.sleep(0.1)
        yield broker, api, [broker.agent_pid, *found]
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            await delete_instances(api)
        await api.aclose()
        if not await asyncio.to_thread(broker.stop):
            broker.cleanup_dir()
