"""11. `lxc file push` and `lxc file pull` of one random file, with the real Debian `lxc` client.

Ours (LXD_DIR: the bench's broker, instance c1) and real LXD's (its own c1, when it answers on
/var/lib/lxd/unix.socket) are interleaved, push and pull in turn, so that machine noise hits both alike.
Each figure is the median MiB/s of the whole `lxc` run (client start-up included, as for a user).
Target: at least twice LXD's throughput both ways.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.context import Context
from bench.harness import Row, ratio

NAME = "files"
TITLE = "11 lxc file push/pull"
TARGET = 2.0  # x LXD's MiB/s
INSIDE = "c1/root/eb-bench.bin"


def _timed(ctx: Context, real_lxd: bool, *args: str) -> float:
    t0 = time.perf_counter()
    r = ctx.lxc("file", *args, real_lxd=real_lxd, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"lxc file {' '.join(args)} ({'LXD' if real_lxd else 'broker'}): "
                           f"{r.stderr.decode(errors='replace').strip()}")
    return dt


def _round(ctx: Context, real_lxd: bool, src: Path, dst: Path, mib: int) -> tuple[float, float]:
    push = _timed(ctx, real_lxd, "push", "-q", str(src), INSIDE)
    pull = _timed(ctx, real_lxd, "pull", "-q", INSIDE, str(dst))
    if dst.stat().st_size != src.stat().st_size:
        raise RuntimeError(f"pulled {dst.stat().st_size} bytes of {src.stat().st_size}")
    dst.unlink()
    return mib / push, mib / pull


async def run(ctx: Context) -> list[Row]:
    mib, n = (64, 5) if ctx.quick else (256, 9)
    lxd = ctx.check_lxd()
    work = Path(tempfile.mkdtemp(prefix="eb-bench-files-"))
    try:
        src, dst = work / "src.bin", work / "dst.bin"
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        ours: dict[str, list[float]] = {"push": [], "pull": []}
        theirs: dict[str, list[float]] = {"push": [], "pull": []}
        _round(ctx, False, src, dst, mib)  # warm up: page cache, client config
        if lxd:
            _round(ctx, True, src, dst, mib)
        for _ in range(n):
            for real, into in ((False, ours), (True, theirs)) if lxd else ((False, ours),):
                push, pull = _round(ctx, real, src, dst, mib)
                into["push"].append(push)
                into["pull"].append(pull)
        for real in (False, True) if lxd else (False,):
            ctx.lxc("exec", "c1", "--", "rm", "-f", "/root/eb-bench.bin", real_lxd=real)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for way in ("push", "pull"):
        mine = statistics.median(ours[way])
        base = statistics.median(theirs[way]) if lxd else None
        r = ratio(mine, base)
        rows.append(Row(TITLE, f"{way} {mib} MiB", mine, "MiB/s", base,
                        "real LXD `lxc file`, same run" if lxd else f"no LXD answering ({ctx.lxd_why})", r,
                        f">= {TARGET:g}x LXD", None if r is None else r >= TARGET,
                        f"n={n}, interleaved, medians",
                        extra={"ours": ours[way], "lxd": theirs[way]}))
    return rows
