"""An exec's timeout (extension ``exec_timeout``): when it expires the command's process group gets
SIGTERM, and SIGKILL after a grace; whoever waits for the command then sees ``expired``."""

from __future__ import annotations

import asyncio
import signal

from core.execspec import TIMEOUT_GRACE, ExitResult, exit_result, timed_out
from node_agent.runtime.spawn import Process


class Deadline:
    def __init__(self, process: Process, seconds: float, grace: float = TIMEOUT_GRACE) -> None:
        self.seconds = seconds
        self.expired = False
        self._process = process
        self._grace = grace
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(self.seconds)
        self.expired = True
        self._process.signal_group(signal.SIGTERM)
        await asyncio.sleep(self._grace)
        self._process.kill_group()

    def cancel(self) -> None:
        """The command ended (or the session closes): nothing more to do."""
        self._task.cancel()


def outcome(deadline: Deadline | None, code: int) -> ExitResult:
    """How a command ended: stopped at its timeout (124), or by its own exit status."""
    if deadline is not None and deadline.expired:
        return timed_out(deadline.seconds)
    return exit_result(code)
