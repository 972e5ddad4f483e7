"""What pid1 does at the instance's process limit (``limits.processes``): the process groups of commands
that have exited are remembered; when a fork failed at the limit since pid1 last looked (the pids
cgroup's ``pids.events``, mounted read-only by runc) or pid1's own fork fails, what those groups still
hold (a fork bomb's orphans, say) is killed and reaped, as the OOM killer makes room for memory, so that
the next exec can run. Commands still running, and whatever detached into a session of its own, are
spared. Stdlib only (see __init__)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Collection

from node_agent.runtime.pid1.syscalls import group_alive

PIDS_EVENTS = ("/sys/fs/cgroup/pids/pids.events", "/sys/fs/cgroup/pids.events")  # cgroup v1, v2
MAX_GROUPS = 4096
TIMEOUT = 1.0


class Reclaimer:
    def __init__(self, isolated: bool) -> None:
        self.isolated = isolated  # PID 1 of the instance's own pid namespace: group ids are its own
        self.groups: dict[int, None] = {}  # process groups of commands that exited, oldest first
        self.events = next((p for p in PIDS_EVENTS if isolated and os.path.exists(p)), None)
        self.hits = 0  # the "max" count of pids.events when we last looked

    def command_started(self, pid: int) -> None:
        """A new command leads a group of its own: a number reused from an exited group names it now."""
        self.groups.pop(pid, None)

    def command_exited(self, pgid: int) -> None:
        self.groups[pgid] = None
        while len(self.groups) > MAX_GROUPS:
            del self.groups[next(iter(self.groups))]

    def limit_hit(self) -> bool:
        """Whether a fork failed at the process limit since the last call."""
        if self.events is None:
            return False
        try:
            with open(self.events, "rb") as f:
                hits = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return False
        hit, self.hits = hits > self.hits, hits
        return hit

    def reclaim(self, reap: Callable[[], None], running: Collection[int]) -> bool:
        """Kill what the exited commands' groups still hold (never the group of a command in ``running``);
        ``reap`` (pid1's) frees their pids. True if anything was killed."""
        killed = False
        if not self.isolated:  # the process driver: group numbers are the host's, never ours to kill
            return False
        for pgid in list(self.groups):
            if pgid in running:
                del self.groups[pgid]
                continue
            try:
                os.killpg(pgid, signal.SIGKILL)
                killed = True
            except OSError:
                del self.groups[pgid]  # nothing left in it
        deadline = time.monotonic() + TIMEOUT
        while killed and time.monotonic() < deadline:
            reap()
            if not any(group_alive(pgid) for pgid in self.groups):
                break
            time.sleep(0.005)
        return killed
