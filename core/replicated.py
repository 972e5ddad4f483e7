"""The cluster-wide records (certificates, projects, pending trust tokens, server config) as a replicated
map: each key holds the record with the highest (version, origin), a deletion is a tombstone, so any two
copies merged in any order reach the same state. IO-free: the cluster-state actor and every member's copy
each wrap one, and disk or GCS persistence is the caller's business."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["certificate", "project", "token", "config"]
KINDS: tuple[Kind, ...] = ("certificate", "project", "token", "config")


@dataclass(frozen=True)
class Record:
    kind: Kind
    key: str
    value: dict[str, Any] | None  # None: deleted
    version: int
    origin: str = ""  # who wrote it: breaks ties between equal versions
    expires_at: float = 0.0  # unix time after which the record may be forgotten (0: never)

    def supersedes(self, other: Record | None) -> bool:
        """A total order: version, then writer, then (for writes that should never collide but could
        after an authority restart) the value itself, so merges agree whatever their order."""
        return other is None or self._order() > other._order()

    def _order(self) -> tuple[int, str, str]:
        return self.version, self.origin, json.dumps(self.value, sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "value": self.value, "version": self.version,
                "origin": self.origin, "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        kind = d["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        value = d.get("value")
        if value is not None and not isinstance(value, dict):
            raise ValueError("record value must be an object or null")
        return cls(kind, str(d["key"]), value, int(d["version"]), str(d.get("origin", "")),
                   float(d.get("expires_at", 0.0)))


class ReplicatedMap:
    def __init__(self, records: Iterable[Record] = ()) -> None:
        self._records: dict[tuple[str, str], Record] = {}
        self.version = 0  # the highest version seen
        self.merge(records)

    def get(self, kind: Kind, key: str) -> dict[str, Any] | None:
        rec = self._records.get((kind, key))
        return None if rec is None else rec.value

    def items(self, kind: Kind) -> dict[str, dict[str, Any]]:
        """The live (not deleted) records of one kind, key -> value."""
        return {k: r.value for (kd, k), r in self._records.items() if kd == kind and r.value is not None}

    def put(self, kind: Kind, key: str, value: dict[str, Any] | None, origin: str,
            expires_at: float = 0.0) -> Record:
        """Write (or, with None, delete) a key as the newest version; returns the record to replicate."""
        rec = Record(kind, key, value, self.version + 1, origin, expires_at)
        self._store(rec)
        return rec

    def delete(self, kind: Kind, key: str, origin: str) -> Record:
        old = self._records.get((kind, key))
        return self.put(kind, key, None, origin, old.expires_at if old is not None else 0.0)

    def merge(self, records: Iterable[Record]) -> list[Record]:
        """Take every record newer than ours; returns those that changed this copy."""
        changed = []
        for rec in records:
            if rec.supersedes(self._records.get((rec.kind, rec.key))):
                self._store(rec)
                changed.append(rec)
            else:
                self.version = max(self.version, rec.version)
        return changed

    def _store(self, rec: Record) -> None:
        self._records[(rec.kind, rec.key)] = rec
        self.version = max(self.version, rec.version)

    def since(self, version: int) -> list[Record]:
        """Every record written after ``version`` (what a copy at that version is missing)."""
        return sorted((r for r in self._records.values() if r.version > version), key=lambda r: r.version)

    def records(self) -> list[Record]:
        return self.since(0)

    def prune(self, now: float) -> list[Record]:
        """Forget records past their expiry (consumed or expired trust tokens); returns them."""
        gone = [r for r in self._records.values() if r.expires_at and r.expires_at < now]
        for rec in gone:
            del self._records[(rec.kind, rec.key)]
        return gone
