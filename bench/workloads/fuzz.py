"""Fuzzing, the long run (not a benchmark: run it with ``--only fuzz``, or ``make fuzz``).

The targets and properties of the short run in the normal suite (tests/fuzz/targets.py and
tests/fuzz/props.py: envelopes, deadlines, no leaked fd or process, the agent still serving) with many
more examples, a random seed unless one is given (it is printed: a failure can be replayed with it),
16 MiB websocket messages among the frames, and failures shrunk to their smallest example.

- ``EXECBROKER_FUZZ_EXAMPLES``: examples per target (default 2000; --quick: 300);
- ``EXECBROKER_FUZZ_SEED``: the seed; ``EXECBROKER_FUZZ_TARGETS``: a comma-separated subset.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import traceback
from pathlib import Path

from bench.context import Context
from bench.harness import Row
from tests.fuzz.props import Fuzz, Outcome, run_target
from tests.fuzz.targets import cleanup, prepare, targets

NAME = "fuzz"
TITLE = "fuzz (long run)"
BUDGET = {"quick": 900, "full": 5400}  # seconds: this workload's own bound (bench/run.py)
OPT_IN = True  # only with --only fuzz: it measures nothing


def _settings(ctx: Context) -> tuple[int, int, list[str]]:
    examples = int(os.environ.get("EXECBROKER_FUZZ_EXAMPLES") or ctx.n(300, 2000))
    seed = int(os.environ.get("EXECBROKER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    names = [n for n in os.environ.get("EXECBROKER_FUZZ_TARGETS", "").split(",") if n]
    return examples, seed, names


def _run(socket: Path, ray_dir: Path, examples: int, seed: int, names: list[str], stop_at: float) -> list[Outcome]:
    """Every target in turn, in this thread's own event loop (what the runner needs); a failure is
    recorded and the next target runs."""
    fz = Fuzz(socket, ray_dir)
    outcomes = []
    try:
        fz.run(prepare(fz), 120, "prepare")
        for target in targets(big_frames=True):
            if names and target.name not in names:
                continue
            if time.monotonic() > stop_at:
                outcomes.append(Outcome(target.name, 0, 0.0, "not run: out of time"))
                continue
            started = time.monotonic()
            print(f"fuzz: {target.name}: {examples} examples, seed {seed} ...", file=sys.stderr, flush=True)
            try:
                outcome = run_target(fz, target, examples, seed_value=seed, shrink=True)
            except Exception as exc:  # noqa: BLE001 - reported, the other targets still run
                text = "".join(traceback.format_exception(exc))  # hypothesis' falsifying example is in it
                outcome = Outcome(target.name, -1, time.monotonic() - started, text)
            print(f"fuzz: {target.name}: {outcome.examples} examples in {outcome.seconds:.0f} s, failures = "
                  f"{1 if outcome.failure else 0}", file=sys.stderr, flush=True)
            if outcome.failure:
                print(outcome.failure, file=sys.stderr, flush=True)
            outcomes.append(outcome)
        fz.run(cleanup(fz), 120, "cleanup")
    finally:
        fz.close()
    return outcomes


async def run(ctx: Context) -> list[Row]:
    assert ctx.broker is not None
    examples, seed, names = _settings(ctx)
    budget = BUDGET["quick" if ctx.quick else "full"]
    outcomes = await asyncio.to_thread(_run, Path(ctx.broker.socket), ctx.broker.base / "ray", examples, seed,
                                       names, time.monotonic() + budget * 0.8)
    failed = [o for o in outcomes if o.failure]
    for o in failed:
        ctx.notes.append(f"fuzz {o.target} (seed {seed}): {o.failure[-20000:]}")
    total = sum(max(o.examples, 0) for o in outcomes)
    print(f"fuzz: {len(outcomes)} targets, {total} examples, seed {seed}, failures = {len(failed)}",
          file=sys.stderr, flush=True)
    return [Row(TITLE, f"{o.target}: examples", max(o.examples, 0) or None, "", target="no failure",
                met=not o.failure, note=(f"FAILED: {o.failure.strip().splitlines()[-1][:200]}" if o.failure
                                         else f"{o.seconds:.0f} s, seed {seed}, failures = 0"))
            for o in outcomes]
