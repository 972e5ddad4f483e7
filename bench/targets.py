"""The performance targets (issue 13), in one table: which row of which workload, the target as the table
prints it, and the verdict from the row's own figures (its value, or its ratio to the baseline measured
in the same run). A row whose figure is missing, or whose baseline could not be measured (no LXD
answering), gets no verdict: ``met`` stays None and the table says "-", never a verdict from a constant."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.harness import Row


@dataclass(frozen=True)
class Target:
    text: str
    ok: Callable[[Row], bool]
    needs_baseline: bool = True  # judged on ``ratio``: no baseline, no verdict


def _ratio_at_most(bound: float) -> Callable[[Row], bool]:
    return lambda r: r.ratio is not None and r.ratio <= bound


def _ratio_at_least(bound: float) -> Callable[[Row], bool]:
    return lambda r: r.ratio is not None and r.ratio >= bound


def _value_at_most(bound: float) -> Callable[[Row], bool]:
    return lambda r: r.value is not None and r.value <= bound


def _value_at_least(bound: float) -> Callable[[Row], bool]:
    return lambda r: r.value is not None and r.value >= bound


FWD = "8 forwarded vs local (3 nodes)"
TARGETS: dict[tuple[str, str], Target] = {
    ("1 API exec `true` (own client)", "p50"): Target("<= 2x nsenter", _ratio_at_most(2.0)),
    ("1 API exec `true` (own client)", "agent CPU per exec"): Target("<= 1.5 ms", _value_at_most(1.5), False),
    ("2 `lxc exec c1 -- true`", "median vs LXD"): Target("<= 0.4x LXD", _ratio_at_most(0.4)),
    ("3 throughput 256 MiB", "stdout, own client"): Target(">= 0.8x host pipe", _ratio_at_least(0.8)),
    ("5 concurrent sessions (cat)", "10000 sessions: RSS growth/session"):
        Target("<= 128 KiB, byte-exact", lambda r: r.value is not None and r.value <= 128 and r.met is not False,
               False),
    ("6 exec rate at saturation", "websocket mode"): Target(">= 1000/s", _value_at_least(1000), False),
    ("6 exec rate at saturation", "task mode"): Target(">= 2000/s", _value_at_least(2000), False),
    ("7 `execbroker up` -> first exec", "seconds"): Target("<= 3 s", _value_at_most(3.0), False),
    (FWD, "exec `true` p50, forwarded"): Target("<= 1.2x local", _ratio_at_most(1.2)),
    (FWD, "`lxc exec -- true` p50, forwarded"): Target("<= 1.2x local", _ratio_at_most(1.2)),
    (FWD, "stdout 256 MiB, forwarded"): Target(">= 0.8x local", _ratio_at_least(0.8)),
    ("9 exec rate, 2 front-end processes vs 1", "task mode, 2 processes"): Target(">= 1.8x 1 process", _ratio_at_least(1.8)),
    ("9 exec rate, 2 front-end processes vs 1", "websocket mode, 2 processes"):
        Target(">= 1.8x 1 process", _ratio_at_least(1.8)),
}


def judge(rows: list[Row]) -> None:
    """Stamp each row that has a target with it and its verdict."""
    for row in rows:
        target = TARGETS.get((row.workload, row.metric))
        if target is None:
            continue
        row.target = target.text
        measured = row.value is not None and (row.baseline is not None or not target.needs_baseline)
        row.met = target.ok(row) if measured else None
        if not measured and "not measured" not in row.note:
            row.note = f"not measured; {row.note}" if row.note else "not measured"
