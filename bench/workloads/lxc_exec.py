"""2. `lxc exec c1 -- true` with the real Debian `lxc` client against the broker (LXD_DIR).

Baselines, interleaved with it so that machine noise hits all alike: `lxc query /1.0` against the broker
(the Go client's own start-up plus one request: the floor of any `lxc` command) and, when a real LXD
answers on /var/lib/lxd/unix.socket, its `lxc exec c1 -- true`.
"""

from __future__ import annotations

import statistics
import time

from bench.context import Context
from bench.harness import Row, ratio, summary_ms, vs_lxd

NAME = "lxc_exec"
TITLE = "2 `lxc exec c1 -- true`"
TARGET_RATIO = 0.5
LXD_ANCHOR_MS = 48.0  # DESIGN.md §3, used only when no LXD answers here


def _timed_lxc(ctx: Context, *args: str, real_lxd: bool = False) -> float:
    t0 = time.perf_counter()
    r = ctx.lxc(*args, real_lxd=real_lxd, timeout=60)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"lxc {' '.join(args)} ({'LXD' if real_lxd else 'broker'}): "
                           f"{r.stderr.decode(errors='replace').strip()}")
    return dt


async def run(ctx: Context) -> list[Row]:
    n = ctx.n(15, 40)
    lxd = ctx.check_lxd()
    for _ in range(3):  # warm up (first run writes the client's config dir)
        _timed_lxc(ctx, "exec", "c1", "--", "true")
        _timed_lxc(ctx, "query", "/1.0")
        if lxd:
            _timed_lxc(ctx, "exec", "c1", "--", "true", real_lxd=True)
    ours, floor, theirs = [], [], []
    for _ in range(n):
        ours.append(_timed_lxc(ctx, "exec", "c1", "--", "true"))
        floor.append(_timed_lxc(ctx, "query", "/1.0"))
        if lxd:
            theirs.append(_timed_lxc(ctx, "exec", "c1", "--", "true", real_lxd=True))
    s, f = summary_ms(ours), summary_ms(floor)
    rows = [Row(TITLE, "median", s["p50"], "ms", f["p50"], "`lxc query /1.0` (client floor)",
                ratio(s["p50"], f["p50"]), note=f"n={n}; over floor {s['p50'] - f['p50']:.1f} ms",
                extra={"ours": s, "lxc_query": f})]
    rows.append(vs_lxd(TITLE, s, theirs if lxd else None, "real LXD `lxc exec c1 -- true`", TARGET_RATIO,
                       LXD_ANCHOR_MS, ctx.lxd_why, n, stdev_ms=statistics.pstdev(ours) * 1e3))
    return rows
