"""py-spy on the agent process while a workload repeats: collapsed stacks on disk, top frames in the JSON.

`py-spy record --format raw` writes one line per distinct stack ("outer;...;leaf count"), which flamegraph.pl
and speedscope both open. Samples are per-function (--function) and never pause the agent (--nonblocking);
idle threads (waiting in epoll) are not sampled, so the shares are of busy CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.harness import cpu_seconds

RATE = 250  # samples per second
TOP = 15
GENERIC = {"BaseEventLoop.run_forever", "BaseEventLoop._run_once", "Handle._run", "<module>"}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ensure_pyspy() -> tuple[str | None, str]:
    """py-spy next to this Python, installed into the venv when missing. Returns (path, problem)."""
    bindir = str(Path(sys.executable).parent)
    found = shutil.which("py-spy", path=bindir)
    if found:
        return found, ""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], capture_output=True, text=True,
                       timeout=300)
    found = shutil.which("py-spy", path=bindir)
    if found:
        return found, ""
    return None, f"py-spy missing and `pip install py-spy` failed: {(r.stderr or r.stdout).strip()[-300:]}"


def short_frame(frame: str) -> str:
    """'read (/x/site-packages/uvicorn/protocols/http.py:12)' -> 'read (uvicorn/protocols/http.py:12)'."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    line = f":{m.group('line')}" if m.group("line") else ""
    return f"{m.group('func')} ({path}{line})"


def area(frame: str) -> str:
    """The top-level package or module of a frame: 'uvicorn', 'asyncio', 'node_agent', 'selectors', ..."""
    m = _FRAME.match(frame)
    path = short_frame(frame).rsplit(" (", 1)[-1].rstrip(")").split(":", 1)[0] if m else frame
    return path.split("/", 1)[0].removesuffix(".py") or "?"


def _generic(frame: str) -> bool:
    """Frames on every stack (thread start, the event loop's own turn) that say nothing in the inclusive list."""
    return area(frame) == "threading" or frame.split(" (", 1)[0] in GENERIC


def summarize(raw: str) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_time[short_frame(frames[-1])] += count
        by_area[area(frames[-1])] += count
        for f in {short_frame(f) for f in frames if not _generic(f)}:
            inclusive[f] += count

    def top(counter: Counter[str], n: int = TOP) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "pct": round(100 * v / total, 1)} for k, v in counter.most_common(n)]

    return {"samples": total, "self": top(self_time), "inclusive": top(inclusive, 2 * TOP),
            "by_area_self": top(by_area)}


class Profiler:
    def __init__(self, pyspy: str, stamp: str, outdir: Path) -> None:
        self.pyspy = pyspy
        self.pid = 0  # the agent's, set once it runs
        self.outdir = outdir
        self.stamp = stamp
        self.results: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def record(self, name: str, seconds: float) -> AsyncIterator[dict[str, Any]]:
        """Sample the agent for ``seconds`` while the caller repeats its load; it sets ``tally["count"]`` to
        the operations done, for the CPU cost per operation (agent and bench process)."""
        out = self.outdir / f"{self.stamp}-{name}.collapsed.txt"
        duration = max(1, math.ceil(seconds))
        proc = await asyncio.create_subprocess_exec(
            self.pyspy, "record", "--pid", str(self.pid), "--duration", str(duration), "--rate", str(RATE),
            "--format", "raw", "--function", "--nonblocking", "--output", str(out),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await asyncio.sleep(0.3)  # attach before the load starts
        tally: dict[str, Any] = {"count": 0}
        cpu0, own0, t0 = cpu_seconds(self.pid), _own_cpu(), time.monotonic()
        try:
            yield tally
        finally:
            wall, count = time.monotonic() - t0, tally["count"]
            load = {"wall_s": round(wall, 2), "ops": count,
                    "agent_cpu_s": round(cpu_seconds(self.pid) - cpu0, 3), "bench_cpu_s": round(_own_cpu() - own0, 3)}
            if count:
                load["agent_cpu_ms_per_op"] = round(1000 * load["agent_cpu_s"] / count, 3)
                load["bench_cpu_ms_per_op"] = round(1000 * load["bench_cpu_s"] / count, 3)
            try:
                _, err = await asyncio.wait_for(proc.communicate(), duration + 60)
            except asyncio.TimeoutError:
                proc.kill()
                _, err = await proc.communicate()
            if proc.returncode == 0 and out.exists():
                self.results[name] = {"file": str(out), "seconds": duration, "load": load,
                                      **summarize(out.read_text())}
            else:
                self.results[name] = {"load": load, "error": f"py-spy exit {proc.returncode}: "
                                               f"{err.decode(errors='replace').strip()[-300:]}"}

    def markdown(self) -> str:
        lines = [f"# Agent profile (py-spy), run {self.stamp}", "",
                 f"py-spy record --rate {RATE} --function --nonblocking on the NodeAgent process (pid {self.pid}) "
                 "while the workload repeated; busy samples only (idle epoll waits excluded).", ""]
        for name, res in self.results.items():
            lines.append(f"## {name}")
            if "error" in res:
                lines += ["", f"failed: {res['error']}", ""]
                continue
            load = res["load"]
            per_op = (f"; agent CPU {load['agent_cpu_ms_per_op']} ms per op, bench process "
                      f"{load['bench_cpu_ms_per_op']} ms" if load.get("ops") else "")
            lines += ["", f"{res['samples']} samples over {res['seconds']} s; {load['ops']} ops in {load['wall_s']} s, "
                          f"agent CPU {load['agent_cpu_s']} s{per_op}.", f"Collapsed stacks: `{res['file']}`", ""]
            for title, key in (("Self time by package", "by_area_self"), ("Top frames, self time", "self"),
                               ("Top frames, inclusive", "inclusive")):
                lines += [f"### {title}", "", "| % | samples | frame |", "|---:|---:|---|"]
                lines += [f"| {r['pct']} | {r['samples']} | `{r['frame']}` |" for r in res[key]]
                lines.append("")
        return "\n".join(lines)
