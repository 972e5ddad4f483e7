"""The output of a detachable exec (extension ``exec_detach``), IO-free: one bounded buffer per stream,
addressed by byte offset since the command started. When it holds ``capacity`` bytes the oldest go and
``earliest`` moves on; ``produced`` is every byte the stream ever had. A reader asks from an offset and
gets what follows it (``Gone`` when that part was dropped)."""

from __future__ import annotations

from collections import deque

from core.errors import BadRequest

DEFAULT_CAPACITY = 8 << 20
MIN_CAPACITY = 64 << 10
MAX_CAPACITY = 256 << 20
_JOIN_BELOW = 64 << 10  # small chunks are joined, so the chunk count stays near capacity / 64 KiB


class Gone(BadRequest):
    def __init__(self, offset: int, earliest: int) -> None:
        super().__init__(f"Output before offset {earliest} is no longer held (asked for {offset})")
        self.earliest = earliest


class ReplayBuffer:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.produced = 0
        self.earliest = 0
        self.closed = False  # the stream ended: nothing more will come
        self._chunks: deque[bytes] = deque()
        self._held = 0

    def append(self, data: bytes) -> None:
        if not data:
            return
        if self._chunks and len(self._chunks[-1]) < _JOIN_BELOW:
            self._chunks[-1] += data
        else:
            self._chunks.append(bytes(data))
        self.produced += len(data)
        self._held += len(data)
        while self._held > self.capacity:
            first = self._chunks[0]
            excess = self._held - self.capacity
            if len(first) <= excess:
                self._chunks.popleft()
                self._held -= len(first)
                self.earliest += len(first)
            else:
                self._chunks[0] = first[excess:]
                self._held -= excess
                self.earliest += excess

    def check(self, offset: int) -> None:
        """Whether a reader may start at ``offset``."""
        if offset < self.earliest:
            raise Gone(offset, self.earliest)
        if offset > self.produced:
            raise BadRequest(f"Offset {offset} is beyond the {self.produced} bytes produced so far")

    def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset`` (b"" when nothing follows it yet)."""
        self.check(offset)
        skip = offset - self.earliest
        out: list[bytes] = []
        size = 0
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            part = chunk[skip:skip + (limit - size)]
            skip = 0
            out.append(part)
            size += len(part)
            if size >= limit:
                break
        return b"".join(out)

    def status(self) -> dict[str, int | bool]:
        return {"produced": self.produced, "earliest": self.earliest, "ended": self.closed}


def capacity_of(value: int | None) -> int:
    if value is None:
        return DEFAULT_CAPACITY
    if not MIN_CAPACITY <= value <= MAX_CAPACITY:
        raise BadRequest(f"buffer-size must be from {MIN_CAPACITY} to {MAX_CAPACITY} bytes")
    return value
