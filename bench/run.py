"""execbroker benchmark suite: `python -m bench.run [--quick] [--only NAME...] [--no-profile]`.

Starts its own broker (`execbroker up` in a fresh temp dir), runs the workloads against it with the baselines
measured in the same run, tears everything down (instances stopped and deleted through the API, the broker
SIGTERMed, nothing of it left), prints one table and writes it as JSON to bench/results/<UTC stamp>.json and
bench/results/latest.json. Quick: under 2 minutes; full: under 10 on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import harness, targets
from bench.context import Context
from bench.harness import BrokerProcess, Row
from bench.profiler import Profiler, ensure_pyspy
from bench.wire import Api
from bench.workloads import DEFAULT, NAMES, WORKLOADS, cluster, startup, workers

RESULTS = Path(__file__).resolve().parent / "results"
# Wall-clock bound per workload (seconds), quick / full.
BUDGET = {"quick": 100, "full": 360}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="execbroker benchmarks")
    p.add_argument("--quick", action="store_true", help="fewer samples, shorter runs (< 2 minutes)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=NAMES,
                   help=f"run only these: {', '.join(NAMES)} (fuzz runs only when named)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy passes")
    return p.parse_args(argv)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    head = ("workload", "figure", "value", "baseline (same run)", "ratio", "target", "met?", "note")
    body = []
    for r in rows:
        base = f"{_fmt(r.baseline, r.unit)} {r.baseline_label}".strip() if r.baseline is not None else (
            r.baseline_label or "-")
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        note = r.note if len(r.note) <= 90 else r.note[:87] + "..."
        body.append((r.workload, r.metric, _fmt(r.value, r.unit), base,
                     f"{r.ratio:.2f}x" if r.ratio is not None else "-", r.target or "-", met, note))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *(line(b) for b in body)])


async def run_workload(module: Any, ctx: Context) -> list[Row]:
    budget = getattr(module, "BUDGET", BUDGET)["quick" if ctx.quick else "full"]
    t0 = time.monotonic()
    print(f"bench: {module.NAME} ...", file=sys.stderr, flush=True)
    try:
        rows = await asyncio.wait_for(module.run(ctx), budget)
    except Exception as exc:  # noqa: BLE001 - one failed workload does not end the run
        detail = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
        ctx.notes.append(f"{module.NAME}: {detail}\n{traceback.format_exc()}")
        rows = [Row(module.TITLE, "-", None, "", note=f"FAILED: {detail}"[:300])]
    print(f"bench: {module.NAME} done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return rows


def _commit() -> str:
    """The commit the run measured ("+dirty" when the tree has changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}+dirty" if rev and dirty else rev or "unknown"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    selected = set(args.only or DEFAULT)
    soft, hard = harness.raise_nofile()
    ctx = Context(quick=args.quick, broker=None, api=None)
    report: dict[str, Any] = {"stamp": stamp, "quick": args.quick, "selected": sorted(selected),
                              "commit": _commit(),
                              "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                       "python": platform.python_version(), "nofile": f"{soft}/{hard}"}}
    RESULTS.mkdir(exist_ok=True)
    pyspy = None
    if not args.no_profile and selected & {"exec_latency", "throughput"}:
        pyspy, problem = ensure_pyspy()
        if problem:
            ctx.notes.append(problem)
        report["py_spy"] = pyspy

    if "startup" in selected:  # before our broker: the two never share the machine
        print("bench: ray start baseline ...", file=sys.stderr, flush=True)
        ctx.baselines["ray_start"] = await asyncio.to_thread(startup.measure_ray_start)
    rows: list[Row] = []
    profiler = None
    modules = [w for w in WORKLOADS if w.NAME in selected and w not in (cluster, workers)]
    if modules:
        profiler = Profiler(pyspy, stamp, RESULTS) if pyspy else None
        rows += await on_own_broker(ctx, modules, report, profiler)
    if "workers" in selected:  # after our broker stopped: brokers of its own, one at a time
        rows += await run_workload(workers, ctx)
    if "cluster" in selected:  # after our broker stopped: one cluster at a time
        rows += await run_workload(cluster, ctx)

    targets.judge(rows)
    report["rows"] = [r.to_json() for r in rows]
    report["notes"] = ctx.notes
    if profiler is not None and profiler.results:
        report["profile"] = profiler.results
        md = profiler.markdown()
        (RESULTS / f"{stamp}-profile.md").write_text(md)
        (RESULTS / "profile-latest.md").write_text(md)
    report["duration_s"] = time.monotonic() - started
    report["table"] = table(rows)
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    shutil.copyfile(path, RESULTS / "latest.json")
    print(report["table"])
    print(f"\n{'quick' if args.quick else 'full'} run at {report['commit']} in {report['duration_s']:.0f}s; "
          f"results: {path}")
    if ctx.notes:
        print("notes:\n  " + "\n  ".join(n.splitlines()[0] for n in ctx.notes))
    return report


async def on_own_broker(ctx: Context, modules: list[Any], report: dict[str, Any],
                        profiler: Profiler | None) -> list[Row]:
    """Start the bench's broker, run ``modules`` against it, tear it down; the rows, teardown's last."""
    broker = BrokerProcess()
    api = Api(broker.socket)
    ctx.broker, ctx.api = broker, api
    rows: list[Row] = []
    try:
        print(f"bench: starting execbroker up in {broker.base} ...", file=sys.stderr, flush=True)
        try:
            await asyncio.to_thread(broker.start)
            await broker.first_exec(api)
        except Exception as exc:  # noqa: BLE001 - reported, then torn down
            ctx.notes.append(f"broker start: {exc}\n{traceback.format_exc()}")
            rows.append(Row("broker", "start", None, "", note=f"FAILED: {exc}"[:300]))
            modules = []
        report["broker"] = {"ready_s": broker.ready_s, "first_exec_s": broker.first_exec_s,
                            "agent_pid": broker.agent_pid, "c1_pid1": broker.pid1}
        if broker.agent_pid:
            report["broker"]["agent_nofile"] = harness.nofile_limit(broker.agent_pid)
            if profiler is not None:
                profiler.pid = broker.agent_pid
                ctx.profile = profiler.record
        for module in modules:
            rows += await run_workload(module, ctx)
    finally:
        info = await teardown(broker, api)
        report.setdefault("broker", {})["teardown"] = info
        ctx.broker = ctx.api = None
        ctx.profile = None
    left = info["leftover_processes"]
    rows.append(Row("teardown", "SIGTERM -> nothing left", broker.stop_s, "s",
                    target="instances deleted via API, no process left",
                    met=not left and not info.get("instance_errors"),
                    note=(f"{len(left)} processes left" if left else "clean")
                    + (f"; instance errors: {info['instance_errors']}" if info.get("instance_errors") else "")))
    return rows


async def teardown(broker: BrokerProcess, api: Api) -> dict[str, Any]:
    """Instances stopped and deleted through the API, the broker SIGTERMed, then nothing of it may be left."""
    out: dict[str, Any] = {}
    if broker.proc is not None and broker.proc.poll() is None:
        out["instance_errors"] = await harness.delete_instances(api)
    await api.aclose()
    left = await asyncio.to_thread(broker.stop)
    out["leftover_processes"] = [cmd[:200] for _, cmd in left]
    out["exit_code"] = broker.proc.returncode if broker.proc is not None else None
    if left or out.get("instance_errors"):
        print(f"bench: WARNING broker teardown not clean, {broker.base} kept: {out}", file=sys.stderr)
    else:
        broker.cleanup_dir()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(main_async(args))
    teardown_info = report.get("broker", {}).get("teardown", {})
    checks = {w.TITLE for w in WORKLOADS if getattr(w, "OPT_IN", False)}  # checks, not figures: a miss fails
    missed = any(r["workload"] in checks and r["met"] is not True for r in report["rows"])
    return 1 if teardown_info.get("leftover_processes") or missed else 0


if __name__ == "__main__":
    sys.exit(main())
