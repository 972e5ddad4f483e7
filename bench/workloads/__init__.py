"""The workloads, in run order. Each module has NAME, TITLE and ``async def run(ctx) -> list[Row]``."""

from bench.workloads import (
    cluster,
    detach,
    exec_latency,
    exec_rate,
    files,
    instances,
    keystroke,
    lxc_exec,
    lxc_https,
    sessions,
    startup,
    throughput,
)

# startup and cluster are special: startup's baseline runs before the broker starts, cluster after it stops.
WORKLOADS = [exec_latency, lxc_exec, lxc_https, throughput, keystroke, sessions, exec_rate, instances, files,
             detach, startup, cluster]
NAMES = [w.NAME for w in WORKLOADS]
