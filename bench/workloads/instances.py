"""10. Unprivileged containers: spawn+wait of `true` through pid1, and instance start (busybox).

Runs the instance runtime in this process (its own temp data dir and cgroup tree, the broker untouched):
* spawn: pid1's spawn of `true` and the wait for its exit, in an unprivileged container (user, pid, mount,
  network namespaces, seccomp). Baseline: `nsenter -t <pid1> -a true` into the same container.
* start: start of a busybox instance until pid1 serves (and, without a baseline, its create: rootfs and
  id shift). Baseline: `runc run` of the same container's bundle with `true` as its process (what the
  runtime itself costs, without our pid1).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.context import Context
from bench.harness import Row, ratio, summary_ms
from node_agent.runtime import cgroups, runc
from node_agent.runtime.instances import InstanceManager
from node_agent.runtime.spawn import SpawnRequest

NAME = "instances"
TITLE = "10 unprivileged container"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
SPAWN_TARGET_MS = 1.5
START_TARGET_S = 0.5


async def _spawn_true(manager: InstanceManager, name: str, devnull: int) -> float:
    t0 = time.perf_counter()
    proc = await manager.spawn(name, SpawnRequest(["true"], ENV), (devnull, devnull, devnull))
    code = await proc.wait()
    dt = time.perf_counter() - t0
    proc.close()
    if code != 0:
        raise RuntimeError(f"true exited {code}")
    return dt


def _nsenter(pid: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nsenter", "-t", str(pid), "-a", "true"], check=True)
    return time.perf_counter() - t0


def _runc_true(manager: InstanceManager, name: str, data_dir: Path) -> float:
    """`runc run` of a copy of the instance's bundle whose process is `true` (same rootfs, namespaces,
    mounts, seccomp and cgroup settings): the runtime's own cost of a container start."""
    bundle = data_dir / "instances" / name
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = ["/bin/true"]
    spec["linux"]["cgroupsPath"] += "-baseline"
    baseline = bundle / "baseline.json"
    baseline.write_text(json.dumps(spec))
    cmd = [runc.binary() or "runc", "--root", str(data_dir / "runc"), "run", "--bundle", str(bundle), name + "-b"]
    os.replace(bundle / "config.json", bundle / "config.json.keep")
    os.replace(baseline, bundle / "config.json")
    try:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0
    finally:
        os.replace(bundle / "config.json.keep", bundle / "config.json")


async def run(ctx: Context) -> list[Row]:
    if os.geteuid() != 0 or runc.binary() is None:
        return [Row(TITLE, "spawn+wait `true`", None, "ms", note="needs root and runc")]
    data_dir = Path(tempfile.mkdtemp(prefix="ebbench-inst-", dir="/tmp"))
    os.chmod(data_dir, 0o711)
    parent = f"execbroker-bench-{os.getpid()}"
    manager = InstanceManager(data_dir, driver="oci", cgroup_parent=parent)
    manager.adopt()
    devnull = os.open(os.devnull, os.O_RDWR)
    rows: list[Row] = []
    try:
        creates, starts, runc_starts = [], [], []
        for i in range(ctx.n(5, 15)):
            name = f"b{i}"
            t0 = time.perf_counter()
            manager.create(name)
            t1 = time.perf_counter()
            await manager.start(name)
            creates.append(t1 - t0)
            starts.append(time.perf_counter() - t1)
            await manager.stop(name, force=True)
            runc_starts.append(_runc_true(manager, name, data_dir))
            await manager.delete(name)
        manager.create("spawn")
        inst = await manager.start("spawn")
        n = ctx.n(200, 1000)
        for _ in range(20):
            await _spawn_true(manager, "spawn", devnull)
        ours = summary_ms([await _spawn_true(manager, "spawn", devnull) for _ in range(n)])
        base = summary_ms([_nsenter(inst.pid) for _ in range(n)]) if shutil.which("nsenter") and inst.pid else None
        rows.append(Row(TITLE, "spawn+wait `true` p50 (pid1)", ours["p50"], "ms",
                        base["p50"] if base else None, "`nsenter -t pid1 -a true`",
                        ratio(ours["p50"], base["p50"] if base else None), f"<= {SPAWN_TARGET_MS} ms",
                        ours["p50"] <= SPAWN_TARGET_MS, f"p95 {ours['p95']:.2f} ms, n={n}",
                        extra={"ours": ours, "nsenter": base}))
        start_s, runc_s = statistics.median(starts), statistics.median(runc_starts)
        rows.append(Row(TITLE, "start busybox p50 (to pid1 serving)", start_s, "s", runc_s, "`runc run` of `true`",
                        ratio(start_s, runc_s), f"<= {START_TARGET_S} s", start_s <= START_TARGET_S,
                        f"n={len(starts)}", extra={"starts": starts, "runc": runc_starts}))
        rows.append(Row(TITLE, "create busybox p50 (rootfs, id shift)", statistics.median(creates), "s",
                        note=f"n={len(creates)}", extra={"creates": creates}))
    finally:
        os.close(devnull)
        for inst in manager.list():
            if inst.status != "Stopped":
                await manager.stop(inst.name, force=True)
            await manager.delete(inst.name)
        cgroups.remove_tree(parent)
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows
