"""Property-based fuzzing of the exec API against the live broker, the short run: every target of
tests/fuzz/targets.py with a bounded number of derandomized examples (the same ones on every run), then
the checks of tests/fuzz/props.py (envelopes, deadlines, no leaked fd or process, still serving).
The long run, with many more examples: ``python -m bench.run --only fuzz`` (``make fuzz``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Broker
from tests.fuzz.execs import ControlCase, attached, control
from tests.fuzz.files import FileCase, files
from tests.fuzz.frames import WS_MAX, Data, FramesCase, ws_frames
from tests.fuzz.props import Fuzz, run_target, settle, snapshot
from tests.fuzz.targets import cleanup, prepare, targets
from tests.fuzz.values import pattern

pytestmark = pytest.mark.broker

TARGETS = {t.name: t for t in targets()}


@pytest.fixture(scope="module")
def fz(broker: Broker) -> Iterator[Fuzz]:
    fuzz = Fuzz(broker.socket, broker.base / "ray")
    fuzz.run(prepare(fuzz), 120, "prepare")
    try:
        yield fuzz
    finally:
        fuzz.run(cleanup(fuzz), 120, "cleanup")
        fuzz.close()


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(fz: Fuzz, name: str) -> None:
    target = TARGETS[name]
    outcome = run_target(fz, target, target.short)
    assert outcome.examples >= target.short // 2, outcome  # (fewer only if the space ran out)


# What fuzzing found, kept as plain examples: each failed before its fix.

@pytest.mark.parametrize("interactive", [False, True])
@pytest.mark.parametrize("message", [
    "[" * 5000 + "]" * 5000,  # RecursionError in parse_control
    '{"command": "window-resize", "args": {"width": 1e999, "height": 40}}',  # OverflowError: int(inf)
    '{"command": "window-resize", "args": {"width": Infinity, "height": 40}}',
])
def test_control_loop_survives_any_message(fz: Fuzz, interactive: bool, message: str) -> None:
    """The control loop died on these, and a SIGKILL request after them was ignored (the exec hung)."""
    fz.run(control(fz, ControlCase(interactive, (message,))))


@pytest.mark.parametrize("stopped", [False, True])
def test_failed_pushes_leak_no_fd(fz: Fuzz, stopped: bool) -> None:
    """A push whose create failed with ENAMETOOLONG left its directory's fd open: in the instance's pid1
    (running) or in the agent (stopped)."""
    before = fz.run(snapshot(fz))
    for _ in range(5):
        fz.run(files(fz, FileCase(stopped, "POST", "/tmp/" + "a" * 300, "path", {}, b"x")))
    fz.run(settle(fz, before))


@pytest.mark.parametrize("detachable", [False, True])
def test_large_stdin_messages_never_block_the_agent(fz: Fuzz, detachable: bool) -> None:
    """A stdin message larger than the pipe is written as the command reads it. The agent's end of the
    stdin pipe was blocking: its whole event loop waited in write(), and as it no longer drained cat's
    output, cat stopped reading: every client of the node hung, for good."""
    async def run() -> None:
        op = await fz.exec_op(["cat"], detachable=detachable)
        async with attached(fz, op) as session:
            data = pattern(WS_MAX)
            assert await session.send("0", data) and await session.send("0", "")
            final, got = await session.ended(fz)
            assert final["metadata"]["return"] == 0 and got["1"] == data, (final, len(got["1"]))

    fz.run(run(), 120)
    fz.run(ws_frames(fz, FramesCase(False, "0", (Data(False, WS_MAX), Data(False, WS_MAX)))), 120)
