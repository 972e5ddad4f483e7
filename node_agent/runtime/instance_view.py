"""A worker process's view of the node's instances: what the agent's InstanceManager keeps on disk, read
again whenever it changed (two ``stat`` calls tell, made at most every ``RECHECK`` seconds: one exec looks
its instance up five times), never written. A worker runs commands in running
instances (pid1's spawn socket takes any process of the node); creating, starting, stopping and
deleting them stays the agent's."""

from __future__ import annotations

import os
import time
from pathlib import Path

from core.errors import NotFound
from node_agent.runtime import launcher, records
from node_agent.runtime.instances import Instance, InstanceManager
from node_agent.runtime.records import KEY_RE, Record

Signature = tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]
_FILES = ("instance.json", "state.json")
RECHECK = 0.1  # seconds a record read is trusted before its files are looked at again


class InstanceView(InstanceManager):
    def __init__(self, data_dir: Path, driver: str, cgroup_parent: str) -> None:
        super().__init__(data_dir, driver=driver, cgroup_parent=cgroup_parent)
        self._loaded = True  # nothing is adopted here: each record is read when asked for
        self._seen: dict[str, tuple[Signature, Record, float]] = {}

    def _signature(self, name: str) -> Signature:
        found: list[tuple[int, int, int] | None] = []
        for file in _FILES:
            try:
                st = os.stat(self._dir(name) / file)
            except FileNotFoundError:
                found.append(None)
            else:
                found.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return found[0], found[1]

    def _record(self, name: str) -> Record:
        now = time.monotonic()
        seen = self._seen.get(name)
        if seen is not None and now - seen[2] < RECHECK:
            return seen[1]
        if not KEY_RE.fullmatch(name):
            raise NotFound("Instance not found")
        sig = self._signature(name)
        if sig[0] is None:
            self._seen.pop(name, None)
            raise NotFound("Instance not found")
        rec = seen[1] if seen is not None and seen[0] == sig else records.load(self._dir(name), name)
        self._seen[name] = (sig, rec, now)
        return rec

    def exists(self, name: str) -> bool:
        return bool(KEY_RE.fullmatch(name)) and (self._dir(name) / _FILES[0]).exists()

    def list(self) -> list[Instance]:
        if not self._root.is_dir():
            return []
        found = []
        for entry in sorted(self._root.iterdir()):
            try:
                found.append(self._snapshot(self._record(entry.name)))
            except NotFound:
                continue
        return found

    def _refresh(self, rec: Record) -> bool:
        """Whether pid1 runs; what a dead one left is the agent's to clean."""
        return rec.pid1 is not None and launcher.is_alive(rec.pid1)
