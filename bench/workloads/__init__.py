"""The workloads, in run order. Each module has NAME, TITLE and ``async def run(ctx) -> list[Row]``; it may
have BUDGET (its own wall-clock bound, quick and full) and OPT_IN (run only when named with --only)."""

from bench.workloads import (
    cluster,
    detach,
    exec_latency,
    exec_rate,
    files,
    fuzz,
    instances,
    keystroke,
    lxc_exec,
    lxc_https,
    sessions,
    startup,
    throughput,
    workers,
)

# startup, workers and cluster are special: startup's baseline runs before the broker starts; workers and
# cluster start brokers of their own after it stopped (one at a time).
WORKLOADS = [exec_latency, lxc_exec, lxc_https, throughput, keystroke, sessions, exec_rate, instances, files,
             detach, fuzz, startup, workers, cluster]
NAMES = [w.NAME for w in WORKLOADS]
DEFAULT = [w.NAME for w in WORKLOADS if not getattr(w, "OPT_IN", False)]  # what a run without --only runs
