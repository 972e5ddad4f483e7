"""Every fuzz target, with the examples each runs in the short run (tests/test_fuzz.py); the long run
(bench/workloads/fuzz.py) takes the same list with more examples."""

from __future__ import annotations

import contextlib

from tests.fuzz import files as file_routes
from tests.fuzz.execs import CONTROL_CASES, EXEC_CASES, control, exec_body
from tests.fuzz.frames import frames_cases, ws_frames
from tests.fuzz.props import Fuzz, Target
from tests.fuzz.routes import NAME_CASES, OP_CASES, names, operations


def targets(big_frames: bool = False) -> list[Target]:
    """``big_frames``: 16 MiB messages among the frames too."""
    return [
        Target("exec_body", EXEC_CASES, exec_body, 120),
        Target("control", CONTROL_CASES, control, 40),
        Target("ws_frames", frames_cases(big_frames), ws_frames, 80),
        Target("operations", OP_CASES, operations, 60),
        Target("files", file_routes.FILE_CASES, file_routes.files, 120),
        Target("names", NAME_CASES, names, 120),
    ]


async def prepare(fz: Fuzz) -> None:
    await file_routes.prepare(fz)


async def cleanup(fz: Fuzz) -> None:
    with contextlib.suppress(AssertionError):
        await file_routes.remove(fz)
