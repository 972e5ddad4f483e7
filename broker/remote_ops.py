"""What a front end remembers of the operations other members run for its clients: the owner, the last
state seen (so a lost member's operation can still be shown, as a Failure naming it) and, for the
websocket operations it forwarded itself, who asked and which sockets it already relays. Bounded: the
oldest entries go first."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from core.errors import ApiError
from core.execspec import find_socket
from core.identity import Identity
from core.operations import Status

LIMIT = 10_000


class RemoteOps:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.owner: OrderedDict[str, str] = OrderedDict()
        self.project: OrderedDict[str, str] = OrderedDict()
        self._last: OrderedDict[str, dict[str, Any]] = OrderedDict()  # last state seen, by op id
        self._forwarded_ws: OrderedDict[str, tuple[Identity, set[str]]] = OrderedDict()

    def remember(self, op: dict[str, Any], owner: str, project: str) -> None:
        self.owner[op["id"]] = owner
        self.owner.move_to_end(op["id"])
        self.project[op["id"]] = project
        self.project.move_to_end(op["id"])
        self._last[op["id"]] = op
        self._last.move_to_end(op["id"])
        self._trim()

    def forwarded_websocket(self, op_id: str, who: Identity) -> None:
        """A websocket operation this member forwarded for ``who``."""
        self._forwarded_ws[op_id] = (who, set())
        self._trim()

    def _trim(self) -> None:
        for cache in (self.owner, self.project, self._last, self._forwarded_ws):
            while len(cache) > self.limit:
                cache.popitem(last=False)

    def lost(self, op_id: str, owner: str) -> dict[str, Any] | None:
        """The last known state of an operation of a lost member, as a Failure naming the member."""
        op = self._last.get(op_id)
        if op is None:
            return None
        if op["status_code"] < 200:
            op = {**op, "status": Status.FAILURE.text, "status_code": int(Status.FAILURE),
                  "err": f"Cluster member {owner} was lost", "may_cancel": False}
            self._last[op_id] = op
        return op

    def running_on(self, member: str) -> list[str]:
        """Operations of ``member`` last seen unfinished."""
        return [op_id for op_id, owner in self.owner.items()
                if owner == member and op_id in self._last and self._last[op_id]["status_code"] < 200]

    def precheck_relay(self, op_id: str, secret: str, who: Identity) -> bool:
        """For a websocket of an operation this member forwarded: the owner's checks (state, requestor,
        secret, duplicate), made here from what the forward told us, so the client is upgraded while
        the owner is dialled instead of after. False when we know too little: dial first."""
        record, op = self._forwarded_ws.get(op_id), self._last.get(op_id)
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
