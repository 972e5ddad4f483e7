"""This member's copy of the cluster-wide records, kept in step with the cluster-state actor (or, with
no cluster, with an authority in this process), kept on disk so a member that restarts, the head
included, still knows every certificate and project, and watched: a revoked certificate's connections
are cut by whoever listens to ``on_change``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from broker.state_actor import StateMachine
from core.errors import ApiError, Unavailable
from core.replicated import Record
from core.server_records import ServerRecords
from node_agent.runtime.records import write_private

log = logging.getLogger(__name__)
FILE = "cluster-state.json"


class Authority(Protocol):
    async def mutate(self, method: str, args: tuple[Any, ...]) -> tuple[int, Any, list[dict[str, Any]]]: ...

    async def merge(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    async def since(self, version: int) -> list[dict[str, Any]]: ...


class LocalAuthority:
    """No cluster: the authoritative copy lives in this process."""

    def __init__(self) -> None:
        self.machine = StateMachine()

    async def mutate(self, method: str, args: tuple[Any, ...]) -> tuple[int, Any, list[dict[str, Any]]]:
        return self.machine.mutate(method, args)

    async def merge(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.machine.merge(records)
        return self.machine.since(0)

    async def since(self, version: int) -> list[dict[str, Any]]:
        return self.machine.since(version)


class ActorAuthority:
    """The cluster-state Ray actor; a call that fails is a 503, reads stay local meanwhile."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as exc:  # noqa: BLE001 - any Ray failure: the cluster state is out of reach
            raise Unavailable(f"The cluster state is unreachable: {type(exc).__name__}") from None

    async def mutate(self, method: str, args: tuple[Any, ...]) -> tuple[int, Any, list[dict[str, Any]]]:
        result: tuple[int, Any, list[dict[str, Any]]] = await self._call("mutate", method, args)
        return result

    async def merge(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("merge", records)
        return result

    async def since(self, version: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("since", version)
        return result


class ServerState:
    def __init__(self, data_dir: Path, authority: Authority | None = None) -> None:
        self.path = data_dir / FILE
        self.records = ServerRecords(origin="")
        self.records.map.merge(self._load())
        self.authority: Authority = authority or LocalAuthority()
        self._watchers: list[Callable[[list[Record]], None]] = []
        self._lock = asyncio.Lock()

    def on_change(self, watcher: Callable[[list[Record]], None]) -> None:
        self._watchers.append(watcher)

    async def start(self) -> None:
        """Our disk copy to the authority (it may have started empty), everything back."""
        records = await self.authority.merge([r.to_json() for r in self.records.map.records()])
        self._apply(records)

    async def refresh(self) -> None:
        self._apply(await self.authority.since(self.records.map.version))

    async def change(self, method: str, *args: Any) -> Any:
        """Run one ServerRecords change at the authority; visible here on return, elsewhere within a
        refresh period."""
        status, value, records = await self.authority.mutate(method, args)
        if status:
            raise ApiError(value, status)
        self._apply(records)
        return value

    def _apply(self, raw: list[dict[str, Any]]) -> None:
        changed = self.records.map.merge(Record.from_json(r) for r in raw)
        if not changed:
            return
        self._save()
        for watch in self._watchers:
            try:
                watch(changed)
            except Exception:
                log.exception("cluster state watcher failed")

    def _load(self) -> list[Record]:
        try:
            return [Record.from_json(r) for r in json.loads(self.path.read_text())]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s unreadable (%s): starting from the cluster's copy", self.path, exc)
            return []

    def _save(self) -> None:
        data = json.dumps([r.to_json() for r in self.records.map.records()], separators=(",", ":"))
        write_private(self.path, data)
