"""A node's front-end processes (its workers), as far as requests are concerned: which process an
operation belongs to, and where the first request of a connection should be served. IO-free.

Process 0 is the agent; processes 1..N-1 are its workers. An operation's id is a UUID whose last byte
names the process that created it, so any process of the node knows, from the id alone, where its
websockets and its waits are served.
"""

from __future__ import annotations

import re
import uuid

MAX_WORKERS = 64  # processes per node (the agent included): what the id's last byte may name
MAX_REQUEST_LINE = 8192  # bytes read of a connection before its first request line must be complete

_OPERATION = re.compile(rb"^/1\.0/operations/([0-9a-f-]{36})(?:/[a-z]*)?(?:\?.*)?$")
_EVENTS = re.compile(rb"^/1\.0/events/?(?:\?.*)?$")


def operation_id(process: int) -> str:
    """A new operation id, created by ``process``."""
    if not 0 <= process < MAX_WORKERS:
        raise ValueError(f"process {process} is out of 0..{MAX_WORKERS - 1}")
    return str(uuid.uuid4())[:-2] + f"{process:02x}"


def process_of(op_id: str) -> int | None:
    """The process that created ``op_id`` (None: not an id of ours)."""
    if len(op_id) != 36:
        return None
    try:
        index = int(op_id[-2:], 16)
    except ValueError:
        return None
    return index if index < MAX_WORKERS else None


def request_line(data: bytes) -> tuple[bytes, bytes] | None:
    """``(method, target)`` of the request line at the start of ``data``; None while incomplete or
    unparsable (the HTTP parser then answers it)."""
    end = data.find(b"\r\n")
    if end < 0:
        return None
    parts = data[:end].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    return parts[0], parts[1]


def first_request_owner(target: bytes, me: int, processes: int) -> int | None:
    """Which process should take a connection whose first request is for ``target`` (None: this one):
    an operation's requests go to the process that runs it; the events websocket to the agent, which
    gathers every process's events."""
    found = _OPERATION.match(target)
    if found is not None:
        owner = process_of(found.group(1).decode())
        return owner if owner is not None and owner != me and owner < processes else None
    if me != 0 and _EVENTS.match(target):
        return 0
    return None


def is_events(target: bytes) -> bool:
    return _EVENTS.match(target) is not None


def operation_in(path: str) -> str | None:
    """The operation id of a ``/1.0/operations/{id}[/...]`` path."""
    found = _OPERATION.match(path.encode())
    return found.group(1).decode() if found is not None else None


def lighter(me: int, loads: list[int], candidates: list[int], capacity: int | None = None) -> int | None:
    """The process a new connection should go to instead of ``me`` (None: keep it): the least loaded of
    ``candidates``, when it has at least two operations fewer in hand than we do (so work spreads, and a
    balanced node hands nothing), or whenever we are at ``capacity`` (what one process's file descriptors
    hold, ``capacity_of``) and it is not."""
    best = min(candidates, key=lambda p: loads[p], default=None)
    if best is None or best == me:
        return None
    if loads[best] + 2 <= loads[me]:
        return best
    if capacity is not None and loads[me] >= capacity > loads[best]:
        return best
    return None


SESSION_FDS = 7  # a websocket exec's file descriptors in its process: 3 websockets, 3 pipe ends, the spawn socket
FD_RESERVE = 1024  # of a process's limit, kept for everything else it holds (listeners, links, files, logs)


def capacity_of(nofile: int) -> int:
    """How many live exec operations a process with ``nofile`` file descriptors takes (all of them
    websocket sessions: the case that needs the most)."""
    return max(1, (nofile - FD_RESERVE) // SESSION_FDS)
