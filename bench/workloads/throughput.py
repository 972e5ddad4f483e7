"""3. stdout and stdin throughput: 256 MiB through `dd`, with the own client and the `lxc` client.

stdout: `dd if=/dev/zero bs=1M count=256` in c1, output discarded by the client. stdin: 256 MiB of zeros
into `dd of=/dev/null bs=1M` in c1. Figures are end to end (POST to `return`, or the whole `lxc` run), so
exec set-up is included, as it is in LXD's. Baseline: the same `dd` into a host pipe of the broker's size
(1 MiB), read in 1 MiB reads into one buffer (stdout; stdin: `dd | dd`); and real LXD's
figures when it answers. Each figure is the median of the repetitions.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import subprocess
import time

from bench.context import Context
from bench.harness import Row, cpu_seconds, ratio
from bench.wire import Api, run_exec

NAME = "throughput"
TITLE = "3 throughput 256 MiB"
MIB = 256
STDOUT_ABS_TARGET = 370.0  # MiB/s
STDOUT_REL_TARGET = 0.4  # of the host pipe

DD_OUT = f"dd if=/dev/zero bs=1M count={MIB}"
DD_IN = "dd of=/dev/null bs=1M"
ZEROS = bytes(1 << 20)


async def stdout_rate(api: Api) -> float:
    """MiB/s of one `dd` of 256 MiB to stdout in c1, POST to `return`."""
    t0 = time.perf_counter()
    out = await run_exec(api, "c1", DD_OUT.split())
    dt = time.perf_counter() - t0
    if out.code != 0 or out.stdout != MIB << 20:
        raise RuntimeError(f"stdout: return {out.code}, {out.stdout} bytes, {out.stderr_text!r}")
    return MIB / dt


async def own_stdout(ctx: Context, cpu: list[float] | None = None) -> float:
    """stdout_rate through the bench's broker; appends the agent's CPU seconds to ``cpu`` when given."""
    assert ctx.api is not None
    cpu0 = cpu_seconds(ctx.agent_pid)
    rate = await stdout_rate(ctx.api)
    if cpu is not None:
        cpu.append(cpu_seconds(ctx.agent_pid) - cpu0)
    return rate


async def own_stdin(ctx: Context) -> float:
    assert ctx.api is not None
    t0 = time.perf_counter()
    out = await run_exec(ctx.api, "c1", DD_IN.split(), stdin=ZEROS, repeat=MIB)
    dt = time.perf_counter() - t0
    if out.code != 0:
        raise RuntimeError(f"stdin: return {out.code} {out.err} {out.stderr_text!r}")
    return MIB / dt


def shell_rate(ctx: Context, script: str, real_lxd: bool | None = None) -> float:
    t0 = time.perf_counter()
    r = ctx.shell(script, real_lxd=real_lxd)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{script}: {r.stderr.decode(errors='replace').strip()}")
    return MIB / dt


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20  # what the broker gives a command's output pipe (F_SETPIPE_SZ)


def host_pipe_stdout() -> float:
    """MiB/s of the same `dd` into a host pipe of the broker's size, read as fast as can be: 1 MiB
    readinto() calls into one reused buffer, until EOF. What any relay of that pipe is bounded by."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        t0 = time.perf_counter()
        proc = subprocess.Popen(DD_OUT.split(), stdout=w, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        os.close(w)
        w = -1
        buf = bytearray(PIPE_SIZE)
        view = memoryview(buf)
        got = 0
        with open(r, "rb", buffering=0, closefd=False) as f:
            while n := f.readinto(view):
                got += n
        dt = time.perf_counter() - t0
        proc.wait(30)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if got != MIB << 20 or proc.returncode != 0:
        raise RuntimeError(f"host pipe: {got} bytes, dd returned {proc.returncode}")
    return MIB / dt


def lxc_stdout(ctx: Context, real_lxd: bool) -> float:
    return shell_rate(ctx, f"lxc exec c1 -- {DD_OUT} >/dev/null 2>&1", real_lxd)


def lxc_stdin(ctx: Context, real_lxd: bool) -> float:
    return shell_rate(ctx, f"{DD_OUT} 2>/dev/null | lxc exec c1 -- {DD_IN} >/dev/null 2>&1", real_lxd)


async def run(ctx: Context) -> list[Row]:
    reps = ctx.n(1, 3)
    lxd = ctx.check_lxd()
    series: dict[str, list[float]] = {k: [] for k in (
        "host_stdout", "host_stdin", "own_stdout", "own_stdin", "lxc_stdout", "lxc_stdin",
        "lxd_stdout", "lxd_stdin")}
    agent_cpu: list[float] = []
    await own_stdout(ctx)  # warm up
    for _ in range(reps):  # interleaved: noise hits every series alike
        for _ in range(ctx.n(3, 2)):  # cheap and the noisiest: more samples
            series["host_stdout"].append(host_pipe_stdout())
            series["host_stdin"].append(shell_rate(ctx, f"{DD_OUT} 2>/dev/null | {DD_IN} 2>/dev/null"))
        series["own_stdout"].append(await own_stdout(ctx, agent_cpu))
        series["own_stdin"].append(await own_stdin(ctx))
        series["lxc_stdout"].append(lxc_stdout(ctx, real_lxd=False))
        series["lxc_stdin"].append(lxc_stdin(ctx, real_lxd=False))
        if lxd:
            series["lxd_stdout"].append(lxc_stdout(ctx, real_lxd=True))
            series["lxd_stdin"].append(lxc_stdin(ctx, real_lxd=True))
    med = {k: (statistics.median(v) if v else None) for k, v in series.items()}
    host_out, host_in = med["host_stdout"], med["host_stdin"]
    own_out = med["own_stdout"]
    r = ratio(own_out, host_out)
    rows = [
        Row(TITLE, "stdout, own client", own_out, "MiB/s", host_out, "host pipe (1 MiB, 1 MiB reads)", r,
            f">= {STDOUT_ABS_TARGET:g} MiB/s and >= {STDOUT_REL_TARGET:g}x host",
            own_out is not None and own_out >= STDOUT_ABS_TARGET and r is not None and r >= STDOUT_REL_TARGET),
        Row(TITLE, "stdout, lxc client", med["lxc_stdout"], "MiB/s", host_out, "host pipe (1 MiB, 1 MiB reads)",
            ratio(med["lxc_stdout"], host_out)),
        Row(TITLE, "stdin, own client", med["own_stdin"], "MiB/s", host_in, "host pipe",
            ratio(med["own_stdin"], host_in)),
        Row(TITLE, "stdin, lxc client", med["lxc_stdin"], "MiB/s", host_in, "host pipe",
            ratio(med["lxc_stdin"], host_in)),
    ]
    cpu_per_gib = statistics.median(agent_cpu) * 1024 / MIB
    rows.append(Row(TITLE, "stdout: agent CPU per GiB", cpu_per_gib, "s", 1024 / own_out if own_out else None,
                    "wall per GiB", ratio(cpu_per_gib, 1024 / own_out if own_out else None),
                    note="agent utime+stime; ratio ~1 = the agent's one core is the limit"))
    if lxd:
        rows += [
            Row(TITLE, "stdout, lxc: broker vs LXD", med["lxc_stdout"], "MiB/s", med["lxd_stdout"],
                "real LXD (lxc)", ratio(med["lxc_stdout"], med["lxd_stdout"])),
            Row(TITLE, "stdin, lxc: broker vs LXD", med["lxc_stdin"], "MiB/s", med["lxd_stdin"],
                "real LXD (lxc)", ratio(med["lxc_stdin"], med["lxd_stdin"])),
        ]
    else:
        rows[0].note = f"no LXD answering ({ctx.lxd_why})"
    rows[0].extra = {"samples": series, "reps": reps}
    if ctx.profile is not None:
        seconds = ctx.seconds(3, 8)
        async with ctx.profile("stdout_throughput", seconds) as tally:
            end = time.monotonic() + seconds
            while time.monotonic() < end and tally["count"] < 100:
                await own_stdout(ctx)
                tally["count"] += 1
    return rows
