"""The bench's targets table (bench/targets.py): a verdict comes only from the row's own figures and the
baseline measured in the same run; without them there is none (no LXD, a failed workload)."""

from __future__ import annotations

from bench.harness import Row, vs_lxd
from bench.targets import FWD, judge


def test_ratio_targets_are_judged_on_the_same_runs_baseline() -> None:
    ok = Row(FWD, "exec `true` p50, forwarded", 12.0, "ms", 10.0, "local", 1.2)
    missed = Row(FWD, "stdout 256 MiB, forwarded", 300.0, "MiB/s", 1000.0, "local", 0.3)
    judge([ok, missed])
    assert (ok.target, ok.met) == ("<= 1.2x local", True)
    assert (missed.target, missed.met) == (">= 0.8x local", False)


def test_no_baseline_no_verdict() -> None:
    row = vs_lxd("2 `lxc exec c1 -- true`", {"p50": 20.0}, None, "real LXD", 0.4, 48.0, "no socket", 10)
    judge([row])
    assert (row.baseline, row.ratio, row.met) == (None, None, None)
    assert row.note.startswith("not measured")


def test_value_targets_need_only_the_value() -> None:
    rows = [Row("7 `execbroker up` -> first exec", "seconds", 2.5, "s"),
            Row("6 exec rate at saturation", "websocket mode", None, "execs/s", note="FAILED: x")]
    judge(rows)
    assert rows[0].met is True
    assert rows[1].met is None and rows[1].note == "not measured; FAILED: x"


def test_rows_without_a_target_are_left_alone() -> None:
    row = Row("4 keystroke echo (PTY)", "p50", 0.2, "ms", 0.02, "local PTY", 10.0, "<= baseline + 2 ms", True)
    judge([row])
    assert (row.target, row.met) == ("<= baseline + 2 ms", True)
