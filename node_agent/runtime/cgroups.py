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
from dataclasses import dataclass
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
                return _read_small(self.path / "freezer.state") != b"THAWED"
            return _read_small(self.path / "cgroup.freeze") == b"1"
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


@dataclass(frozen=True)
class Figures:
    """What ``/1.0/metrics`` reports of one group: CPU seconds per CPU and mode, memory in bytes by kind
    (LXD's names: RSS, Cached, Swap, MemTotal, ...), OOM kills, processes. Empty where not accounted."""

    cpu: dict[tuple[str, str], float]  # (cpu, "user" | "system") -> seconds
    memory: dict[str, int]
    oom_kills: int | None
    processes: int | None


def figures(path: str, host_memory: int) -> Figures:
    rel = path.lstrip("/")
    v1, v2 = _mounts()
    if "memory" in v1 or "cpuacct" in v1:
        return _figures_v1(v1, rel, host_memory)
    if v2 is None:
        return Figures({}, {}, None, None)
    group = v2 / rel
    stat = _flat(group / "cpu.stat")
    cpu = {("0", mode): stat[f"{mode}_usec"] / 1e6 for mode in ("user", "system") if f"{mode}_usec" in stat}
    mem = _flat(group / "memory.stat")
    usage = _read_int(group / "memory.current")
    limit = _read_int(group / "memory.max") or host_memory
    memory = {"RSS": mem.get("anon"), "Cached": mem.get("file"), "Shmem": mem.get("shmem"),
              "Active_anon": mem.get("active_anon"), "Inactive_anon": mem.get("inactive_anon"),
              "Active_file": mem.get("active_file"), "Inactive_file": mem.get("inactive_file"),
              "Dirty": mem.get("file_dirty"), "Writeback": mem.get("file_writeback"),
              "Unevictable": mem.get("unevictable"), "Mapped": mem.get("file_mapped"),
              "Swap": _read_int(group / "memory.swap.current"), "MemTotal": limit}
    if usage is not None:
        memory["MemFree"] = max(limit - usage, 0)
        memory["MemAvailable"] = max(limit - usage + (mem.get("inactive_file") or 0), 0)
    return Figures(cpu, {k: v for k, v in memory.items() if v is not None},
                   _flat(group / "memory.events").get("oom_kill"), _read_int(group / "pids.current"))


def _figures_v1(v1: dict[str, Path], rel: str, host_memory: int) -> Figures:
    cpu: dict[tuple[str, str], float] = {}
    if "cpuacct" in v1:
        try:
            rows = (v1["cpuacct"] / rel / "cpuacct.usage_all").read_text().splitlines()[1:]
        except OSError:
            rows = []
        for row in rows:
            fields = row.split()
            if len(fields) == 3 and all(f.isdigit() for f in fields):
                cpu[(fields[0], "user")] = int(fields[1]) / 1e9
                cpu[(fields[0], "system")] = int(fields[2]) / 1e9
    memory: dict[str, int] = {}
    oom_kills = None
    if "memory" in v1:
        group = v1["memory"] / rel
        mem = _flat(group / "memory.stat")
        usage = _read_int(group / "memory.usage_in_bytes")
        limit = min(_read_int(group / "memory.limit_in_bytes") or host_memory, host_memory)
        both = _read_int(group / "memory.memsw.usage_in_bytes")
        named = {"RSS": "total_rss", "Cached": "total_cache", "Shmem": "total_shmem",
                 "Active_anon": "total_active_anon", "Inactive_anon": "total_inactive_anon",
                 "Active_file": "total_active_file", "Inactive_file": "total_inactive_file",
                 "Dirty": "total_dirty", "Writeback": "total_writeback", "Unevictable": "total_unevictable",
                 "Mapped": "total_mapped_file"}
        memory = {ours: mem[theirs] for ours, theirs in named.items() if theirs in mem}
        memory["MemTotal"] = limit
        if usage is not None:
            memory["MemFree"] = max(limit - usage, 0)
            memory["MemAvailable"] = max(limit - usage + mem.get("total_inactive_file", 0), 0)
            if both is not None:
                memory["Swap"] = max(both - usage, 0)
        oom_kills = _flat(group / "memory.oom_control").get("oom_kill")
    processes = _read_int(v1["pids"] / rel / "pids.current") if "pids" in v1 else None
    return Figures(cpu, memory, oom_kills, processes)


def _flat(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (``name value`` lines) as numbers; empty if unreadable."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


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


def _read_small(path: Path) -> bytes:
    """A one-line kernel file, stripped (no buffered file object: this is read on every exec)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 256).strip()
    finally:
        os.close(fd)
