"""The cluster-state actor: the authoritative copy of the cluster-wide records (certificates, projects,
trust tokens, server config). One at a time, its methods serialize every change (a token works once even
when two members race for it); it keeps the records in Ray's key-value store across its own restarts, and
members push what they keep on disk when it starts empty (after a head restart nothing is lost)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from core.errors import ApiError
from core.replicated import Record, ReplicatedMap
from core.server_records import ServerRecords

STATE_NAME = "execbroker-cluster-state"
KV_KEY = b"execbroker/cluster-state"


class StateMachine:
    """The actor's logic, IO-free: ``mutate`` runs one ServerRecords change; results travel as JSON."""

    def __init__(self, saved: bytes | None = None) -> None:
        records = [Record.from_json(r) for r in json.loads(saved)] if saved else []
        # one writer name per incarnation: two incarnations never write the same (version, writer)
        self.records = ServerRecords(ReplicatedMap(records), f"cluster-{uuid.uuid4().hex[:12]}")

    def dump(self) -> bytes:
        return json.dumps([r.to_json() for r in self.records.map.records()], separators=(",", ":")).encode()

    def mutate(self, method: str, args: tuple[Any, ...]) -> tuple[int, Any, list[dict[str, Any]]]:
        """(0, value, records) or (status, message, []) for an ApiError."""
        if method.startswith("_") or not callable(getattr(ServerRecords, method, None)):
            return 400, f"unknown change {method}", []
        try:
            result = getattr(self.records, method)(*args)
        except ApiError as exc:
            return exc.status, exc.message, []
        value, records = result if isinstance(result, tuple) else (None, result)
        return 0, value, [r.to_json() for r in records]

    def merge(self, records: list[dict[str, Any]]) -> bool:
        return bool(self.records.map.merge(Record.from_json(r) for r in records))

    def since(self, version: int) -> list[dict[str, Any]]:
        self.records.map.prune(time.time())
        return [r.to_json() for r in self.records.map.since(version)]


def make_actor():  # type: ignore[no-untyped-def]
    import ray
    from ray.experimental import internal_kv

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class ClusterState:
        def __init__(self) -> None:
            self.machine = StateMachine(internal_kv._internal_kv_get(KV_KEY))

        def _save(self) -> None:
            internal_kv._internal_kv_put(KV_KEY, self.machine.dump(), overwrite=True)

        def mutate(self, method: str, args: tuple[Any, ...]) -> tuple[int, Any, list[dict[str, Any]]]:
            status, value, records = self.machine.mutate(method, args)
            if records:
                self._save()
            return status, value, records

        def merge(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """A member's records (from its disk) in; everything out."""
            if self.machine.merge(records):
                self._save()
            return self.machine.since(0)

        def since(self, version: int) -> list[dict[str, Any]]:
            return self.machine.since(version)

    return ClusterState
