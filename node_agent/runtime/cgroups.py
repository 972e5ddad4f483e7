"""The freezer cgroup of one instance: cgroup v1 ``freezer`` controller, or v2 ``cgroup.freeze``.

pid1's launcher writes its own pid into ``procs_file`` before it forks, so pid1 and every process of the
instance live in the group: freezing the group freezes the instance, and the group lists whatever is left
of it after a kill.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Literal

Version = Literal["v1", "v2"]


@functools.cache
def detect() -> tuple[Version, Path] | None:
    """The hierarchy that can freeze: v1 ``freezer`` if mounted, else a cgroup2 mount, else None."""
    v2: Path | None = None
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for _dev, mountpoint, fstype, options, *_ in mounts:
        if fstype == "cgroup" and "freezer" in options.split(","):
            return "v1", Path(mountpoint)
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(mountpoint)
    if v2 is not None and (v2 / "cgroup.controllers").exists():
        return "v2", v2
    return None


class Freezer:
    def __init__(self, version: Version, root: Path, parent: str, name: str) -> None:
        self.version = version
        self.path = root / parent / name

    @classmethod
    def for_instance(cls, parent: str, name: str) -> Freezer | None:
        """The instance's freezer, or None where no hierarchy can freeze or we may not create groups."""
        found = detect()
        if found is None:
            return None
        version, root = found
        group_parent = root / parent
        if not os.access(group_parent if group_parent.exists() else root, os.W_OK):
            return None
        return cls(version, root, parent, name)

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def request(self, frozen: bool) -> None:
        """Ask the kernel to freeze or thaw; it settles asynchronously (see ``settled``)."""
        if self.version == "v1":
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
        else:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")

    def settled(self, frozen: bool) -> bool:
        """True once every task of the group is frozen (or thawed)."""
        try:
            if self.version == "v1":
                state = (self.path / "freezer.state").read_text().strip()
                return state == ("FROZEN" if frozen else "THAWED")
            events = (self.path / "cgroup.events").read_text().split()
            return events[events.index("frozen") + 1] == ("1" if frozen else "0")
        except (OSError, ValueError, IndexError):
            return not frozen

    def is_frozen(self) -> bool:
        """Frozen or freezing: either way the instance cannot serve a spawn now."""
        try:
            if self.version == "v1":
                return (self.path / "freezer.state").read_text().strip() != "THAWED"
            return (self.path / "cgroup.freeze").read_text().strip() == "1"
        except OSError:
            return False

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in self.procs_file.read_text().split()]
        except OSError:
            return []

    def kill_all(self) -> None:
        """SIGKILL whatever is left in the group (thawed first: v1 frozen tasks cannot die)."""
        if self.is_frozen():
            self.request(False)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
