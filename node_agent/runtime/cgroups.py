"""An instance's cgroups: its freezer (cgroup v1 ``freezer`` controller, or v2 ``cgroup.freeze``) and what
it uses (memory, CPU time, processes), read off the v1 controllers or the v2 hierarchy.

Containers get their groups from runc (``linux.cgroupsPath`` = ``/<parent>/<key>``, the same path in each
hierarchy); with the process driver, pid1's launcher writes its own pid into ``procs_file`` before it
forks. Either way pid1 and every process of the instance live in the group: freezing the group freezes the
instance, and the group lists whatever is left of it after a kill.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Literal

Version = Literal["v1", "v2"]


def detect() -> tuple[Version, Path] | None:
    """The hierarchy that can freeze: v1 ``freezer`` if mounted, else a cgroup2 mount, else None."""
    v1, v2 = _mounts()
    if "freezer" in v1:
        return "v1", v1["freezer"]
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


@functools.cache
def _mounts() -> tuple[dict[str, Path], Path | None]:
    """v1 controller -> its mount point; and the cgroup2 mount, if any."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    try:
        with open("/proc/self/mounts") as f:
            for _dev, mountpoint, fstype, options, *_ in (line.split() for line in f):
                if fstype == "cgroup":
                    for opt in options.split(","):
                        v1.setdefault(opt, Path(mountpoint))
                elif fstype == "cgroup2" and v2 is None:
                    v2 = Path(mountpoint)
    except OSError:
        pass
    return v1, v2


def _read_int(path: Path, key: str | None = None) -> int | None:
    """A number from a cgroup file: the whole file, or the value of ``key`` in a flat-keyed one."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        if key is None:
            return int(text.split()[0]) if text.strip() not in ("", "max") else None
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except ValueError:
        return None
    return None


def usage(path: str) -> dict[str, int | None]:
    """What the group at ``path`` (``/<parent>/<key>``) uses now: memory bytes (and the peak), CPU time in
    nanoseconds, processes; None where this host does not account it."""
    rel = path.lstrip("/")
    v1, v2 = _mounts()
    if "memory" in v1 or "pids" in v1 or "cpuacct" in v1:
        return {
            "memory": _read_int(v1["memory"] / rel / "memory.usage_in_bytes") if "memory" in v1 else None,
            "memory_peak": _read_int(v1["memory"] / rel / "memory.max_usage_in_bytes") if "memory" in v1 else None,
            "cpu_ns": _read_int(v1["cpuacct"] / rel / "cpuacct.usage") if "cpuacct" in v1 else None,
            "processes": _read_int(v1["pids"] / rel / "pids.current") if "pids" in v1 else None,
        }
    if v2 is None:
        return {"memory": None, "memory_peak": None, "cpu_ns": None, "processes": None}
    group = v2 / rel
    cpu_us = _read_int(group / "cpu.stat", "usage_usec")
    return {"memory": _read_int(group / "memory.current"), "memory_peak": _read_int(group / "memory.peak"),
            "cpu_ns": cpu_us * 1000 if cpu_us is not None else None, "processes": _read_int(group / "pids.current")}


def controller_dir(controller: str, path: str) -> Path | None:
    """Where the group ``path`` is in the hierarchy holding ``controller`` (v1), else in cgroup2."""
    v1, v2 = _mounts()
    root = v1.get(controller, v2)
    return root / path.lstrip("/") if root is not None else None


def limit_files(path: str) -> dict[str, Path]:
    """Where the kernel holds the group's limits (for tests and diagnostics): memory, cpu, pids."""
    rel = path.lstrip("/")
    v1, v2 = _mounts()
    if "memory" in v1:
        return {"memory": v1["memory"] / rel / "memory.limit_in_bytes", "cpu": v1["cpu"] / rel / "cpu.cfs_quota_us",
                "pids": v1["pids"] / rel / "pids.max"}
    assert v2 is not None
    return {"memory": v2 / rel / "memory.max", "cpu": v2 / rel / "cpu.max", "pids": v2 / rel / "pids.max"}


def remove_tree(parent: str) -> list[Path]:
    """Remove the groups of ``/<parent>`` (the node's tree) in every hierarchy, deepest first; returns the
    groups that could not go (they still hold processes)."""
    v1, v2 = _mounts()
    roots = {*v1.values(), *([v2] if v2 is not None else [])}
    left: list[Path] = []
    for root in roots:
        top = root / parent.strip("/")
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(Path(dirpath))
    return left
