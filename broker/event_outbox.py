"""The event batches waiting to be sent to one peer member: in order, bounded in batches and in bytes.

Each batch is its JSON text, made once per batch for every peer. Past either bound the oldest batches go
(the peer's clients miss those events; the caller logs it), never the newest: one batch larger than the
byte bound still goes alone."""

from __future__ import annotations

import asyncio
from collections import deque

BATCHES = 1000  # batches queued for one peer
BYTES = 32 << 20  # bytes of the batches queued for one peer


class EventOutbox:
    def __init__(self, limit: int = BATCHES, max_bytes: int = BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0
        self._batches: deque[str] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._batches)

    def put(self, batch: str) -> int:
        """Queue ``batch`` (JSON text); the number of older batches dropped to make room."""
        self._batches.append(batch)
        self.bytes += len(batch)
        dropped = 0
        while len(self._batches) > 1 and (len(self._batches) > self.limit or self.bytes > self.max_bytes):
            self.bytes -= len(self._batches.popleft())
            dropped += 1
        self._ready.set()
        return dropped

    async def get(self) -> str:
        """The oldest batch, when there is one."""
        while not self._batches:
            self._ready.clear()
            await self._ready.wait()
        batch = self._batches.popleft()
        self.bytes -= len(batch)
        return batch
