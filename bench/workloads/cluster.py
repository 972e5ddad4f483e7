"""8. Forwarded vs local exec on a 3-node cluster on this machine.

Runs after the single-node broker has stopped, so that only one cluster runs at a time. The cluster is the
project's own deploy/local-cluster.sh (as in cluster_tests): node1 is the head and creates c1, node2 and
node3 join. The same exec latency and stdout throughput are measured against c1 through node1's socket
(local) and through node2's (forwarded to node1).

Whether the CLI can join a cluster at all is detected from `execbroker up --help`; a front end that does not
find another member's instance is reported as such, not assumed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.context import Context
from bench.harness import BIN, Row, cpu_seconds, delete_instances, ratio, summary_ms, wait_gone
from bench.wire import Api
from bench.workloads.exec_latency import exec_true
from bench.workloads.throughput import stdout_rate
from node_agent.runtime import cgroups
from node_agent.service import cgroup_parent

NAME = "cluster"
TITLE = "8 forwarded vs local (3 nodes)"
SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local-cluster.sh"


def cluster_supported() -> tuple[bool, str]:
    try:
        out = subprocess.run([str(BIN / "execbroker"), "up", "--help"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`execbroker up --help` failed: {exc}"
    if "--address" not in out.stdout:
        return False, "cluster support missing (`execbroker up` has no --address)"
    if not SCRIPT.exists():
        return False, f"cluster support missing ({SCRIPT.name} not found)"
    return True, ""


def unavailable(reason: str) -> list[Row]:
    return [Row(TITLE, "forwarded/local", None, "", note=f"not available: {reason}")]


FANOUT_INSTANCES = 100
FANOUT_TARGET = 2.0  # x (one exec + N x the exec CPU cost over the cores)


async def _task_exec(api: Api) -> float:
    t0 = time.perf_counter()
    await api.finish(await api.call("POST", "/1.0/instances/c1/exec",
                                    {"command": ["true"], "wait-for-websocket": False}))
    return time.perf_counter() - t0


async def _fanout(cluster: LocalCluster, api: Api, count: int) -> Row:
    """`true` on ``count`` instances spread over the 3 members, in one fan-out request, against one exec
    plus ``count`` times the CPU an exec costs the agents, spread over the machine's cores."""
    names = [f"fan{i:03d}" for i in range(count)]
    slots = asyncio.Semaphore(8)

    async def make(i: int, name: str) -> None:
        async with slots:
            await api.finish(await api.call("POST", f"/1.0/instances?target=node{i % 3 + 1}",
                                            {"name": name, "source": {"type": "image", "alias": "busybox"},
                                             "start": True}), 120)

    await asyncio.gather(*(make(i, n) for i, n in enumerate(names)))
    pids = []
    for k in (1, 2, 3):
        member = Api(cluster.socket(k))
        try:
            pids.append(int((await member.get("/1.0"))["environment"]["server_pid"]))
        finally:
            await member.aclose()
    for _ in range(5):
        await _task_exec(api)
    one = statistics.median([await _task_exec(api) for _ in range(20)])
    cpu0 = sum(cpu_seconds(p) for p in pids)
    for _ in range(30):
        await _task_exec(api)
    cpu_per_exec = (sum(cpu_seconds(p) for p in pids) - cpu0) / 30
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    op = await api.finish(await api.call("POST", "/1.0/exec", {"command": ["true"], "instances": names,
                                                               "concurrency": count}), 300)
    wall = time.perf_counter() - t0
    ok = sum(r.get("status") == "Success" for r in op["metadata"]["results"].values())
    bound = one + count * cpu_per_exec / cores
    r = ratio(wall, bound)
    return Row(TITLE, f"fan-out `true` x{count}", wall * 1e3, "ms", bound * 1e3,
               f"one exec {one * 1e3:.1f} ms + {count} x {cpu_per_exec * 1e3:.2f} ms CPU / {cores} cores",
               r, f"<= {FANOUT_TARGET:g}x", r is not None and r <= FANOUT_TARGET,
               f"{ok}/{count} succeeded, 3 members, concurrency {count}")


async def _latency(api: Api, n: int) -> dict[str, float]:
    for _ in range(5):
        await exec_true(api)
    return summary_ms([await exec_true(api) for _ in range(n)])


class LocalCluster:
    """deploy/local-cluster.sh (the cluster tests' set-up too): node1 is the head and creates c1."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = nodes
        self.base = Path(tempfile.mkdtemp(prefix="ebbench-cluster-", dir="/tmp"))
        self.base.chmod(0o711)  # instances' roots (unprivileged host uids) pass through to their rootfs
        self.env = {**os.environ, "RAY_TMPDIR": str(self.base / "ray")}

    def socket(self, k: int) -> str:
        return str(self.base / f"node{k}" / "unix.socket")

    def script(self, *args: str, timeout: float) -> None:
        r = subprocess.run(["sh", str(SCRIPT), *args, str(self.base)], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"local-cluster.sh {' '.join(args)}: {(r.stderr or r.stdout).strip()[-300:]}")

    def start(self) -> None:
        self.script("up", str(self.nodes), timeout=400)

    def lxc_latency(self, n: int) -> tuple[dict[str, float], dict[str, float]]:
        """``lxc exec c1 -- true`` (c1 lives on node1) through node1 and through node2, interleaved."""
        (self.base / "home").mkdir(exist_ok=True)

        def once(k: int) -> float:
            env = {**self.env, "LXD_DIR": str(self.base / f"node{k}"), "HOME": str(self.base / "home")}
            t0 = time.perf_counter()
            r = subprocess.run(["lxc", "exec", "c1", "--", "true"], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"lxc exec via node{k}: {r.stderr.decode(errors='replace').strip()}")
            return time.perf_counter() - t0

        for k in (1, 2, 1, 2):  # warm-up: the client's config dir, the member link
            once(k)
        local, forwarded = [], []
        for _ in range(n):
            local.append(once(1))
            forwarded.append(once(2))
        return summary_ms(local), summary_ms(forwarded)

    async def stop(self) -> list[str]:
        """Instances deleted through the head, every node stopped, then nothing may mention the base dir."""
        api = Api(self.socket(1))
        try:
            problems = await delete_instances(api)
        finally:
            await api.aclose()
        try:
            await asyncio.to_thread(self.script, "down", timeout=400)
        except Exception as exc:  # noqa: BLE001 - reported
            problems.append(str(exc))
        left = await asyncio.to_thread(wait_gone, str(self.base), 30)
        problems += [f"left: {cmd[:120]}" for _, cmd in left]
        problems += [f"left: cgroup {g}" for k in range(1, self.nodes + 1)
                     for g in cgroups.remove_tree(cgroup_parent(self.base / f"node{k}"))]
        if not problems:
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


async def run(ctx: Context) -> list[Row]:
    ok, why = cluster_supported()
    if not ok:
        return unavailable(why)
    if ctx.quick:
        return [Row(TITLE, "forwarded/local", None, "", note="skipped in --quick (3 Ray nodes; runs in full)")]
    cluster = LocalCluster()
    try:
        rows = await _measure(ctx, cluster)
    except Exception as exc:  # noqa: BLE001 - reported as a row, the run goes on
        rows = [Row(TITLE, "forwarded/local", None, "", note=f"failed: {type(exc).__name__}: {exc}"[:300])]
    finally:
        problems = await cluster.stop()
    if problems:
        rows[-1].note += f"; teardown: {'; '.join(problems)[:300]}"
        ctx.notes.append(f"cluster teardown: {problems}")
    return rows


async def _measure(ctx: Context, cluster: LocalCluster) -> list[Row]:
    t0 = time.perf_counter()
    await asyncio.to_thread(cluster.start)
    up_s = time.perf_counter() - t0
    local, forwarded = Api(cluster.socket(1)), Api(cluster.socket(2))
    try:
        deadline = time.monotonic() + 30  # node2 learns the members from its refresh loop
        while True:
            try:
                await forwarded.get("/1.0/instances/c1")
                break
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() > deadline:
                    return unavailable(f"node2 does not serve node1's instance c1 ({exc})")
                await asyncio.sleep(0.5)
        n = ctx.n(50, 200)
        lat_local, lat_fwd = await _latency(local, n), await _latency(forwarded, n)
        n_lxc = ctx.n(10, 30)
        lxc_local, lxc_fwd = await asyncio.to_thread(cluster.lxc_latency, n_lxc)
        rates_local, rates_fwd = [], []
        for _ in range(ctx.n(1, 3)):
            rates_local.append(await stdout_rate(local))
            rates_fwd.append(await stdout_rate(forwarded))
        fan = await _fanout(cluster, local, FANOUT_INSTANCES)
    finally:
        await local.aclose()
        await forwarded.aclose()
    thr_l, thr_f = statistics.median(rates_local), statistics.median(rates_fwd)
    return [fan, 
        Row(TITLE, "exec `true` p50, forwarded", lat_fwd["p50"], "ms", lat_local["p50"], "local (node1)",
            ratio(lat_fwd["p50"], lat_local["p50"]), note=f"n={n}; 3 nodes up in {up_s:.1f}s",
            extra={"local": lat_local, "forwarded": lat_fwd}),
        Row(TITLE, "exec `true` p99, forwarded", lat_fwd["p99"], "ms", lat_local["p99"], "local (node1)",
            ratio(lat_fwd["p99"], lat_local["p99"])),
        Row(TITLE, "`lxc exec -- true` p50, forwarded", lxc_fwd["p50"], "ms", lxc_local["p50"], "local (node1)",
            ratio(lxc_fwd["p50"], lxc_local["p50"]), note=f"n={n_lxc}, interleaved",
            extra={"local": lxc_local, "forwarded": lxc_fwd}),
        Row(TITLE, "stdout 256 MiB, forwarded", thr_f, "MiB/s", thr_l, "local (node1)", ratio(thr_f, thr_l),
            extra={"local": rates_local, "forwarded": rates_fwd}),
    ]
