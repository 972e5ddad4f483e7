"""What a front end remembers of the operations other members run for its clients: the owner, the last
state seen (so a lost member's operation can still be shown, as a Failure naming it) and, for the
websocket operations it forwarded itself, who asked and which sockets it already relays.

Bounded in entries and in bytes, the oldest going first: each entry's size is the length of its JSON,
measured once when it is stored. An operation whose JSON is larger than ``ENTRY_BYTES`` (a fan-out's
results, metadata as large as a client made it) is stored trimmed (``trim``): what the cache is read for
(id, class, status, owner's location, ``fds`` and ``detachable`` for the relay precheck) and the small
metadata values, never the large ones.

A finished operation is kept ``FINISHED_FOR`` seconds (its owner keeps it 5 s), then dropped: the cache
holds what runs and what just ended, not the last 10,000 operations of the whole cluster (measured by the
soak: held entries cost 4-7 times their JSON in memory, and every member hears of every operation)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import ApiError
from core.execspec import find_socket
from core.identity import Identity
from core.operations import Status

LIMIT = 10_000  # entries
BYTES = 32 << 20  # JSON bytes of every entry together (10,000 typical entries are ~10 MiB)
ENTRY_BYTES = 16 << 10  # JSON bytes of one entry; a larger operation is stored trimmed
VALUE_BYTES = 1 << 10  # a trimmed entry keeps the metadata values (and resources) up to this size
ERR_CHARS = 1 << 10  # and this much of its error text
FINISHED_FOR = 10.0  # seconds a finished operation stays (twice its owner's retention)

_KEPT = ("id", "class", "description", "created_at", "updated_at", "status", "status_code", "may_cancel",
         "location")
_KEPT_METADATA = ("fds", "detachable")  # what precheck_relay reads, whatever their size


def size_of(op: dict[str, Any]) -> int:
    """Bytes of ``op``'s JSON (ASCII-escaped, so characters are bytes)."""
    return len(json.dumps(op, separators=(",", ":")))


def trim(op: dict[str, Any], limit: int = ENTRY_BYTES) -> tuple[dict[str, Any], int]:
    """``op`` as it is stored, and its size: whole when it fits in ``limit``, else without its large parts."""
    size = size_of(op)
    if size <= limit:
        return op, size
    meta: dict[str, Any] = op["metadata"] if isinstance(op.get("metadata"), dict) else {}
    kept_meta = {k: v for k, v in meta.items() if k in _KEPT_METADATA or size_of({k: v}) <= VALUE_BYTES}
    resources = op.get("resources")
    small = {k: op[k] for k in _KEPT if k in op}
    small["err"] = str(op.get("err") or "")[:ERR_CHARS]
    small["resources"] = resources if isinstance(resources, dict) and size_of(resources) <= VALUE_BYTES else {}
    whole = {**small, "metadata": kept_meta}
    size = size_of(whole)
    if size <= limit:
        return whole, size
    bare = {**small, "resources": {}, "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta}}
    return bare, size_of(bare)  # only the owner's own fields are left: as small as it gets


@dataclass
class _Entry:
    owner: str
    project: str
    op: dict[str, Any]  # last state seen
    size: int  # of op's JSON
    expires: float = 0.0  # once finished: when it goes


class RemoteOps:
    def __init__(self, limit: int = LIMIT, max_bytes: int = BYTES, entry_bytes: int = ENTRY_BYTES,
                 finished_for: float = FINISHED_FOR, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.entry_bytes = entry_bytes
        self.finished_for = finished_for
        self.clock = clock
        self.bytes = 0  # JSON bytes held, over every entry
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by op id, oldest first
        self._forwarded_ws: OrderedDict[str, tuple[Identity, set[str]]] = OrderedDict()
        self._finished: deque[tuple[float, str]] = deque()  # (expires, op id), in the order they finished

    def __len__(self) -> int:
        return len(self._entries)

    def owner_of(self, op_id: str) -> str | None:
        entry = self._entries.get(op_id)
        return entry.owner if entry is not None else None

    def project_of(self, op_id: str, default: str = "") -> str:
        entry = self._entries.get(op_id)
        return entry.project if entry is not None else default

    def last(self, op_id: str) -> dict[str, Any] | None:
        """The last state seen of the operation, as stored (maybe trimmed)."""
        entry = self._entries.get(op_id)
        return entry.op if entry is not None else None

    def remember(self, op: dict[str, Any], owner: str, project: str) -> None:
        op_id = op["id"]
        known = self._entries.get(op_id)
        if known is not None and known.op["status_code"] >= 200 and op["status_code"] < 200:
            return  # a late reply (a forward's 202) after the final event: the end stands
        self._drop(op_id)
        stored, size = trim(op, self.entry_bytes)
        self._entries[op_id] = entry = _Entry(owner, project, stored, size)
        self.bytes += size
        self._finish(op_id, entry)
        self._trim()

    def _finish(self, op_id: str, entry: _Entry) -> None:
        """Drop what finished long enough ago; start the clock of ``entry`` if it just finished."""
        now = self.clock()
        while self._finished and self._finished[0][0] <= now:
            expires, gone = self._finished.popleft()
            old = self._entries.get(gone)
            if old is not None and old.expires == expires:
                self._drop(gone)
                self._forwarded_ws.pop(gone, None)
        if entry.op["status_code"] >= 200 and not entry.expires:
            entry.expires = now + self.finished_for
            self._finished.append((entry.expires, op_id))

    def forwarded_websocket(self, op_id: str, who: Identity) -> None:
        """A websocket operation this member forwarded for ``who``."""
        self._forwarded_ws[op_id] = (who, set())
        self._forwarded_ws.move_to_end(op_id)
        while len(self._forwarded_ws) > self.limit:
            self._forwarded_ws.popitem(last=False)

    def _drop(self, op_id: str) -> None:
        entry = self._entries.pop(op_id, None)
        if entry is not None:
            self.bytes -= entry.size

    def _trim(self) -> None:
        while self._entries and (len(self._entries) > self.limit or self.bytes > self.max_bytes):
            op_id, entry = self._entries.popitem(last=False)
            self.bytes -= entry.size
            self._forwarded_ws.pop(op_id, None)  # its precheck needs the state: the owner checks instead

    def lost(self, op_id: str, owner: str, reason: str = "") -> dict[str, Any] | None:
        """The last known state of an operation of a lost member, as a Failure naming the member (or
        ``reason``)."""
        entry = self._entries.get(op_id)
        if entry is None:
            return None
        op = entry.op
        if op["status_code"] < 200:
            op = {**op, "status": Status.FAILURE.text, "status_code": int(Status.FAILURE),
                  "err": reason or f"Cluster member {owner} was lost", "may_cancel": False}
            size = size_of(op)
            self.bytes += size - entry.size
            entry.op, entry.size = op, size
            self._finish(op_id, entry)
        return op

    def running_on(self, member: str) -> list[str]:
        """Operations of ``member`` last seen unfinished."""
        return [op_id for op_id, entry in self._entries.items()
                if entry.owner == member and entry.op["status_code"] < 200]

    def precheck_relay(self, op_id: str, secret: str, who: Identity) -> bool:
        """For a websocket of an operation this member forwarded: the owner's checks (state, requestor,
        secret, duplicate), made here from what the forward told us, so the client is upgraded while
        the owner is dialled instead of after. False when we know too little: dial first."""
        record, op = self._forwarded_ws.get(op_id), self.last(op_id)
        if record is None or op is None:
            return False
        requestor, relayed = record
        if op.get("metadata", {}).get("detachable"):
            return False  # sockets come and go, with offsets: only the owner knows
        if op["status_code"] != int(Status.RUNNING):
            raise ApiError("Only running operations can be connected", 500)
        if not who.same_requestor(requestor):
            raise ApiError("Requestor mismatch", 403)
        fd = find_socket(op.get("metadata", {}).get("fds") or {}, secret)
        if fd is None:
            raise ApiError("Forbidden", 403)
        if fd in relayed:
            raise ApiError("Websocket number already connected", 409)
        relayed.add(fd)
        return True
