"""Median time to run `true` inside an instance: our pid1 spawn vs `nsenter -t PID -a true`.

    sudo .venv/bin/python bench/spawn_bench.py [-n 300] [--image busybox|host]

Creates a throwaway instance in a temporary data dir, starts it, measures, stops and deletes it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.runtime.cgroups import Freezer  # noqa: E402
from node_agent.runtime.instances import InstanceManager  # noqa: E402
from node_agent.runtime.spawn import SpawnRequest  # noqa: E402

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


async def bench_spawn(manager: InstanceManager, name: str, n: int) -> list[float]:
    devnull = os.open(os.devnull, os.O_RDWR)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            proc = await manager.spawn(name, SpawnRequest(["true"], ENV), (devnull, devnull, devnull))
            code = await proc.wait()
            times.append(time.perf_counter() - t0)
            proc.close()
            assert code == 0, code
    finally:
        os.close(devnull)
    return times


def bench_nsenter(pid: int, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["nsenter", "-t", str(pid), "-a", "true"], check=True)
        times.append(time.perf_counter() - t0)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--image", default="busybox")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="ebbench", dir="/tmp"))
    manager = InstanceManager(data_dir, cgroup_parent="execbroker-bench")
    name = f"bench{os.getpid()}"
    manager.create(name, image=args.image)
    try:
        inst = await manager.start(name)
        await bench_spawn(manager, name, 20)  # warm up
        ours = await bench_spawn(manager, name, args.n)
        theirs = bench_nsenter(inst.pid, args.n) if shutil.which("nsenter") and inst.pid else []
        med = statistics.median(ours) * 1e3
        print(f"driver={manager.driver_name} image={args.image} n={args.n}")
        print(f"pid1 spawn+wait `true`: median {med:.3f} ms, p90 {statistics.quantiles(ours, n=10)[-1] * 1e3:.3f} ms")
        if theirs:
            med2 = statistics.median(theirs) * 1e3
            print(f"nsenter -t PID -a true:  median {med2:.3f} ms")
            print(f"ratio nsenter/pid1: {med2 / med:.2f}x")
    finally:
        await manager.stop(name, force=True)
        await manager.delete(name)
        shutil.rmtree(data_dir, ignore_errors=True)
        freezer = Freezer.for_instance("execbroker-bench", name)
        if freezer is not None:
            try:
                os.rmdir(freezer.path.parent)
            except OSError:
                pass


if __name__ == "__main__":
    asyncio.run(main())
