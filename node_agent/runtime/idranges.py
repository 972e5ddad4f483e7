"""The host ids execbroker's containers map to: one range delegated to ``execbroker`` in ``/etc/subuid``
and ``/etc/subgid`` (as LXD's ``root:1000000:1000000000``), chosen clear of every other delegation and of
the ids in ``/etc/passwd`` and ``/etc/group``, so that root of an instance is nobody else on the host: not
a user, not an LXD or podman container. Each instance takes 65536 ids of it.

``python3 node_agent/runtime/idranges.py claim`` (deploy/system-deps.sh) writes the delegation if there is
none; the agent does the same at start. Stdlib only.
"""

from __future__ import annotations

import fcntl
import os
import sys
from dataclasses import dataclass
from pathlib import Path

OWNER = "execbroker"
PER_INSTANCE = 65536
INSTANCES = 4096  # instances per node the delegation holds
FLOOR = 1_000_000
TOP = 2**31  # ids above this confuse tools that keep them in signed ints
SUBUID, SUBGID = Path("/etc/subuid"), Path("/etc/subgid")
PASSWD, GROUP = Path("/etc/passwd"), Path("/etc/group")


@dataclass(frozen=True)
class Range:
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count

    def overlaps(self, other: Range) -> bool:
        return self.start < other.end and other.start < self.end


def parse(text: str) -> list[tuple[str, Range]]:
    """``name:start:count`` lines (comments and malformed lines skipped)."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdecimal() and parts[2].isdecimal():
            found.append((parts[0], Range(int(parts[1]), int(parts[2]))))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _account_ids(path: Path) -> list[int]:
    ids = []
    for line in _read(path).splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2].isdecimal():
            ids.append(int(fields[2]))
    return ids


def delegated(subuid: Path = SUBUID, subgid: Path = SUBGID) -> Range | None:
    """The range delegated to execbroker, if both files hold the same one."""
    uids = [r for name, r in parse(_read(subuid)) if name == OWNER]
    gids = [r for name, r in parse(_read(subgid)) if name == OWNER]
    if uids and gids and uids[0] == gids[0]:
        return uids[0]
    return None


def choose(taken: list[Range], ids: list[int], count: int = PER_INSTANCE * INSTANCES) -> Range:
    """The lowest range of ``count`` ids from FLOOR, aligned to PER_INSTANCE, that overlaps no ``taken``
    range and holds none of ``ids``."""
    start = FLOOR
    while start + count <= TOP:
        candidate = Range(start, count)
        clash = [r.end for r in taken if r.overlaps(candidate)] + [i + 1 for i in ids if start <= i < candidate.end]
        if not clash:
            return candidate
        start = -(-max(clash) // PER_INSTANCE) * PER_INSTANCE  # past the clash, aligned
    raise RuntimeError(f"no free range of {count} host ids below {TOP} for {OWNER}")


def claim(subuid: Path = SUBUID, subgid: Path = SUBGID, passwd: Path = PASSWD, group: Path = GROUP) -> Range:
    """The delegated range; written to both files first if there is none (under a lock: several agents of
    one host may start at once)."""
    found = delegated(subuid, subgid)
    if found is not None:
        return found
    with open(os.open(subuid.with_name(".execbroker-subid.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return delegated(subuid, subgid) or _write_claim(subuid, subgid, passwd, group)


def _write_claim(subuid: Path, subgid: Path, passwd: Path, group: Path) -> Range:
    taken = [r for path in (subuid, subgid) for name, r in parse(_read(path)) if name != OWNER]
    chosen = choose(taken, _account_ids(passwd) + _account_ids(group))
    for path in (subuid, subgid):
        kept = [line for line in _read(path).splitlines() if not line.startswith(f"{OWNER}:")]
        _replace(path, "\n".join([*kept, f"{OWNER}:{chosen.start}:{chosen.count}"]) + "\n")
    return chosen


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    if sys.argv[1:] != ["claim"]:
        sys.exit("usage: idranges.py claim")
    r = claim()
    print(f"{OWNER}: host ids {r.start}-{r.end - 1} in {SUBUID} and {SUBGID}")
