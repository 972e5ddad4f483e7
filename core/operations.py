"""Operations: an explicit state machine, one render function, one event per transition.

An ``Operation`` is pure state. ``OperationRegistry`` runs each operation's coroutine on the event loop,
keeps finished operations for ``retention`` seconds (Incus keeps 5 s), and lets callers wait on them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Any, Literal

from core import timefmt
from core.errors import ApiError, BadRequest, NotFound
from core.identity import Identity

OpClass = Literal["task", "websocket", "token"]


class Status(IntEnum):
    CREATED = 100
    STARTED = 101
    STOPPED = 102
    RUNNING = 103
    CANCELLING = 104
    PENDING = 105
    SUCCESS = 200
    FAILURE = 400
    CANCELLED = 401

    @property
    def text(self) -> str:
        return _STATUS_TEXT[self]

    @property
    def final(self) -> bool:
        return self >= 200


_STATUS_TEXT = {
    Status.CREATED: "Operation created",
    Status.STARTED: "Started",
    Status.STOPPED: "Stopped",
    Status.RUNNING: "Running",
    Status.CANCELLING: "Cancelling",
    Status.PENDING: "Pending",
    Status.SUCCESS: "Success",
    Status.FAILURE: "Failure",
    Status.CANCELLED: "Cancelled",
}

_ALLOWED: dict[Status, set[Status]] = {
    Status.PENDING: {Status.RUNNING, Status.FAILURE, Status.CANCELLED},
    Status.RUNNING: {Status.SUCCESS, Status.FAILURE, Status.CANCELLING},
    Status.CANCELLING: {Status.CANCELLED, Status.SUCCESS, Status.FAILURE},
}


@dataclass
class Operation:
    cls: OpClass
    description: str
    resources: dict[str, list[str]]
    metadata: dict[str, Any]
    requestor: Identity | None
    location: str
    project: str = "default"
    may_cancel: bool = False
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: Status = Status.PENDING
    err: str = ""
    created_at: datetime = field(default_factory=timefmt.now)
    updated_at: datetime = field(default_factory=timefmt.now)
    on_change: Callable[[Operation], None] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"/1.0/operations/{self.id}"

    def _emit(self) -> None:
        self.updated_at = timefmt.now()
        if self.on_change is not None:
            self.on_change(self)

    def transition(self, to: Status, err: str = "") -> None:
        if to not in _ALLOWED.get(self.status, set()):
            raise ValueError(f"operation {self.id}: {self.status.name} -> {to.name} not allowed")
        self.status = to
        if err:
            self.err = err
        self._emit()

    def extend_metadata(self, extra: dict[str, Any]) -> None:
        self.metadata = {**self.metadata, **extra}
        self._emit()


def render(op: Operation) -> dict[str, Any]:
    """The Incus Operation object (spec §2)."""
    return {
        "id": op.id,
        "class": op.cls,
        "description": op.description,
        "created_at": timefmt.rfc3339(op.created_at),
        "updated_at": timefmt.rfc3339(op.updated_at),
        "status": op.status.text,
        "status_code": int(op.status),
        "resources": op.resources,
        "metadata": op.metadata,
        "may_cancel": op.may_cancel and not op.status.final,
        "err": op.err,
        "location": op.location,
    }


RunFn = Callable[[Operation], Awaitable[None]]
CancelFn = Callable[[], Awaitable[None]]


class OperationRegistry:
    """The node's operations: creation, running, retention, waiting, cancelling."""

    def __init__(
        self,
        location: str,
        on_change: Callable[[Operation], None],
        retention: float = 5.0,
        on_expire: Callable[[str], None] | None = None,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.location = location
        self._new_id = new_id  # this process's ids (core/workers.py)
        self.retention = retention
        self._on_change = on_change
        self._on_expire = on_expire
        self._ops: dict[str, Operation] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, CancelFn] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self.max_per_requestor: int | None = None  # live operations one requestor may have
        self._live: dict[tuple[str, str], int] = {}  # requestor -> its live (not final) operations

    @property
    def live(self) -> int:
        """Operations not finished yet (the work this process has in hand)."""
        return sum(self._live.values())

    def create(
        self,
        cls: OpClass,
        description: str,
        resources: dict[str, list[str]],
        metadata: dict[str, Any],
        requestor: Identity | None,
        project: str = "default",
        may_cancel: bool = False,
    ) -> Operation:
        who = _requestor_key(requestor)
        if self.max_per_requestor is not None and self._live.get(who, 0) >= self.max_per_requestor:
            raise ApiError(f"Too many running operations for {who[0]} (limit {self.max_per_requestor})", 429)
        op = Operation(
            cls=cls,
            description=description,
            resources=resources,
            metadata=metadata,
            requestor=requestor,
            location=self.location,
            project=project,
            may_cancel=may_cancel,
            id=self._new_id(),
            on_change=self._changed,
        )
        self._ops[op.id] = op
        self._done[op.id] = asyncio.Event()
        self._live[who] = self._live.get(who, 0) + 1
        self._changed(op)
        return op

    def start(self, op: Operation, run: RunFn, cancel: CancelFn | None = None) -> None:
        """Move to Running and run ``run(op)``: return → Success, exception → Failure with its text."""
        op.transition(Status.RUNNING)
        if cancel is not None:
            self._cancel[op.id] = cancel
        self._tasks[op.id] = asyncio.get_running_loop().create_task(self._run(op, run))

    async def _run(self, op: Operation, run: RunFn) -> None:
        try:
            await run(op)
        except asyncio.CancelledError:
            self._finish(op, Status.CANCELLED if op.status == Status.CANCELLING else Status.FAILURE, "Cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a run function ends its operation
            if op.status == Status.CANCELLING:  # whatever the cancelled work raised on its way out
                self._finish(op, Status.CANCELLED)
            else:
                self._finish(op, Status.FAILURE, exc.message if isinstance(exc, ApiError) else
                             (str(exc) or type(exc).__name__))
        else:
            self._finish(op, Status.CANCELLED if op.status == Status.CANCELLING else Status.SUCCESS)
        finally:
            self._tasks.pop(op.id, None)
            self._cancel.pop(op.id, None)

    def _finish(self, op: Operation, to: Status, err: str = "") -> None:
        if op.status.final:
            return
        op.transition(to, err if to == Status.FAILURE else "")

    def _changed(self, op: Operation) -> None:
        self._on_change(op)
        if op.status.final:
            who = _requestor_key(op.requestor)
            left = self._live.get(who, 1) - 1
            if left > 0:
                self._live[who] = left
            else:
                self._live.pop(who, None)
            self._done[op.id].set()
            loop = asyncio.get_running_loop()
            self._expiry[op.id] = loop.call_later(self.retention, self._expire, op.id)

    def _expire(self, op_id: str) -> None:
        self._ops.pop(op_id, None)
        self._done.pop(op_id, None)
        self._expiry.pop(op_id, None)
        if self._on_expire is not None:
            self._on_expire(op_id)

    def get(self, op_id: str) -> Operation:
        try:
            return self._ops[op_id]
        except KeyError:
            raise NotFound("Operation not found") from None

    def list(self, project: str | None = "default") -> list[Operation]:
        return [op for op in self._ops.values() if project is None or op.project in (project, "")]

    async def wait(self, op_id: str, timeout: float | None) -> Operation:
        op = self.get(op_id)
        done = self._done[op_id]
        if not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return op

    async def cancel(self, op_id: str) -> None:
        op = self.get(op_id)
        if op.status != Status.RUNNING:
            raise BadRequest("Only running operations can be cancelled")
        hook = self._cancel.get(op_id)
        if not op.may_cancel or hook is None:
            raise BadRequest("This operation can't be cancelled")
        op.transition(Status.CANCELLING)
        await hook()

    async def close(self) -> None:
        """Daemon shutdown: cancel what runs and forget everything at once."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for handle in self._expiry.values():
            handle.cancel()
        self._ops.clear()
        self._done.clear()
        self._expiry.clear()


def _requestor_key(requestor: Identity | None) -> tuple[str, str]:
    return (requestor.username, requestor.protocol) if requestor is not None else ("", "")
