"""The exec audit log of one member (extension ``exec_audit``): one JSON line per exec that ran, appended
when it ends (who asked and how they connected, member, instance, project, command, mode, start, end,
status, exit code, bytes in and out), in ``<data dir>/audit.jsonl`` (0600). Bounded: past ``max_bytes``
the file becomes ``audit.jsonl.1`` (the one before is dropped) and a new one starts."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

MAX_BYTES = 64 << 20
MAX_LIMIT = 10_000


class AuditLog:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                os.close(fd)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.write(fd, line)
        finally:
            os.close(fd)

    def tail(self, limit: int, projects: Any = None) -> list[dict[str, Any]]:
        """The last ``limit`` records (oldest first) whose project ``projects(name)`` allows (blocking)."""
        kept: deque[dict[str, Any]] = deque(maxlen=limit)
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below, one file at a time
            except FileNotFoundError:
                continue
            with f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if isinstance(record, dict) and (projects is None or projects(str(record.get("project", "")))):
                        kept.append(record)
        return list(kept)
