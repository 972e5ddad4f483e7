"""The events hub: listeners with bounded queues, delivering each listener's events in publish order.

A listener that cannot keep up is disconnected (Incus does the same), never silently skipped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from core import timefmt

EVENT_TYPES = frozenset({"logging", "operation", "lifecycle"})
QUEUE_LIMIT = 4096


class Listener:
    def __init__(self, types: frozenset[str], project: str | None) -> None:
        self.types = types
        self.project = project  # None: all projects
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = False

    def wants(self, event_type: str, project: str) -> bool:
        if event_type not in self.types:
            return False
        return self.project is None or not project or project == self.project

    def offer(self, frame: str) -> None:
        if self.dropped:
            return
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.close()

    def close(self) -> None:
        """End the stream: the reader gets None after what is queued (or at once when full)."""
        if self.dropped:
            return
        self.dropped = True
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def next(self) -> str | None:
        """The next event as JSON text, or None when the listener was closed."""
        return await self._queue.get()


Observer = Callable[[str, dict[str, Any], str], None]


class EventHub:
    def __init__(self, location: str = "none") -> None:
        self.location = location
        self._listeners: set[Listener] = set()
        self.observers: list[Observer] = []  # see every event of local origin (cluster fan-out)

    def subscribe(self, types: Iterable[str], project: str | None = "default") -> Listener:
        listener = Listener(frozenset(types), project)
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
                if listener.dropped:
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
