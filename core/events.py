"""The events hub: listeners with bounded queues, delivering each listener's events in publish order.

A listener that cannot keep up is dropped (Incus disconnects it too), never silently skipped: when its
queue would pass ``QUEUE_LIMIT`` events or ``QUEUE_BYTES`` bytes, what it holds is released at once, its
reader gets the end of the stream, and ``on_drop`` (the websocket's adapter) is told why, so the socket
closes with ``DROP_CODE`` and that reason even while a send to the client is blocked. A frame larger than
``QUEUE_BYTES`` still goes to a listener with nothing queued. Frames are shared by every listener they go
to: one JSON text per event.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from core import timefmt

EVENT_TYPES = frozenset({"logging", "operation", "lifecycle"})
QUEUE_LIMIT = 4096  # events queued for one listener
QUEUE_BYTES = 8 << 20  # bytes of the events queued for one listener (as much as the kernel buffers for it)
DROP_CODE = 1008  # websocket close code of a dropped listener (policy violation, as for a revoked client)


class Listener:
    def __init__(self, types: frozenset[str], project: str | None, limit: int = QUEUE_LIMIT,
                 max_bytes: int = QUEUE_BYTES) -> None:
        self.types = types
        self.project = project  # None: all projects
        self.limit = limit
        self.max_bytes = max_bytes
        self.queued = 0  # bytes of the frames in the queue
        self._frames: deque[str] = deque()
        self._ready = asyncio.Event()
        self.closed = False  # takes no more events: closed, or dropped
        self.dropped = False  # closed because it was too slow
        self.reason = ""  # why it was dropped
        self.on_drop: Callable[[str], None] | None = None
        self.on_ready: Callable[[], None] | None = None  # a frame was queued, or the stream ended (push readers)

    def wants(self, event_type: str, project: str) -> bool:
        if event_type not in self.types:
            return False
        return self.project is None or not project or project == self.project

    def offer(self, frame: str) -> None:
        if self.closed:
            return
        if self._frames and len(self._frames) >= self.limit:
            self.drop(f"events listener too slow: {len(self._frames)} events queued (limit {self.limit})")
        elif self._frames and self.queued + len(frame) > self.max_bytes:
            self.drop(f"events listener too slow: {self.queued} bytes queued (limit {self.max_bytes})")
        else:
            self._frames.append(frame)
            self.queued += len(frame)  # JSON is ASCII: characters are bytes
            self._ready.set()
            if self.on_ready is not None:
                self.on_ready()

    def drop(self, reason: str) -> None:
        """Too slow: release what is queued, end the stream at once, tell ``on_drop``."""
        if self.closed:
            return
        self._frames.clear()
        self.queued = 0
        self.dropped = True
        self.reason = reason
        self.close()
        if self.on_drop is not None:
            self.on_drop(reason)

    def close(self) -> None:
        """End the stream: the reader gets None after what is queued."""
        self.closed = True
        self._ready.set()
        if self.on_ready is not None:
            self.on_ready()

    def take(self) -> str | None:
        """The next queued frame, if any (a push reader's ``next``)."""
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self.queued -= len(frame)
        return frame

    async def next(self) -> str | None:
        """The next event as JSON text, or None when the listener was closed."""
        while not self._frames:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        self.queued -= len(frame)
        return frame


Observer = Callable[[str, dict[str, Any], str], None]


class EventHub:
    def __init__(self, location: str = "none", queue_limit: int = QUEUE_LIMIT,
                 queue_bytes: int = QUEUE_BYTES) -> None:
        self.location = location
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self._listeners: set[Listener] = set()
        self.observers: list[Observer] = []  # see every event of local origin (cluster fan-out)
        self.observing: Callable[[], bool] = lambda: True  # whether the observers want events now

    def wants(self, event_type: str, project: str) -> bool:
        """Whether an event would reach anyone (else its metadata need not even be made)."""
        if self.observers and self.observing():
            return True
        return any(listener.wants(event_type, project) for listener in self._listeners)

    def subscribe(self, types: Iterable[str], project: str | None = "default") -> Listener:
        listener = Listener(frozenset(types), project, self.queue_limit, self.queue_bytes)
        self._listeners.add(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        listener.close()

    def publish(self, event_type: str, metadata: dict[str, Any], project: str = "default",
                location: str | None = None, forwarded: bool = False) -> None:
        """Deliver to the listeners; events of local origin (not ``forwarded``) also go to observers."""
        if not forwarded:
            for observe in self.observers:
                observe(event_type, metadata, project)
        event: dict[str, Any] = {
            "type": event_type,
            "timestamp": timefmt.rfc3339(timefmt.now()),
            "metadata": metadata,
            "location": location or self.location,
        }
        if project:
            event["project"] = project
        frame: str | None = None
        for listener in list(self._listeners):
            if listener.wants(event_type, project):
                if frame is None:
                    frame = json.dumps(event)
                listener.offer(frame)
                if listener.closed:
                    self._listeners.discard(listener)

    def close(self) -> None:
        for listener in list(self._listeners):
            listener.close()
        self._listeners.clear()


def lifecycle(action: str, source: str, requestor: dict[str, str] | None = None,
              context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of a lifecycle event (``instance-started``, ``instance-exec``, ...)."""
    meta: dict[str, Any] = {"action": action, "source": source, "context": context or {}}
    if requestor:
        meta["requestor"] = requestor
    return meta
