"""asyncio helpers without IO."""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


async def first_of(*aws: Awaitable[Any]) -> None:
    """Run them together until the first ends; the others are cancelled and awaited (nothing outlives it)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_held: set[asyncio.Task[Any]] = set()  # started tasks, until they end (the loop keeps only weak references)


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run ``coro`` as a task that runs at once, up to its first suspension (Python >= 3.12: a request
    answered without waiting costs no turn of the loop), held until it ends."""
    loop = asyncio.get_running_loop()
    task = asyncio.Task(coro, loop=loop, eager_start=True) if _EAGER else loop.create_task(coro)  # type: ignore[call-arg]
    if not task.done():
        _held.add(task)
        task.add_done_callback(_held.discard)
    return task


_EAGER = sys.version_info >= (3, 12)


class Ticking(Protocol):
    def tick(self, now: float) -> None:
        """Called every period while registered: check this member's own deadlines against ``now``."""


class Ticker:
    """Many timeouts of one kind on one timer: every ``period`` seconds each member's ``tick(now)`` runs
    (a member keeps and checks its own deadlines). Arming a timeout is a set insertion instead of a timer
    handle in the loop's heap (an exec armed ~16), at the price of firing up to ``period`` late. With no
    member the ticker does not wake the loop. One per loop and period: ``ticker(period)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self._members: set[Ticking] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, member: Ticking) -> None:
        self._members.add(member)
        if self._handle is None:
            self._handle = self.loop.call_later(self.period, self._tick)

    def discard(self, member: Ticking) -> None:
        self._members.discard(member)

    def _tick(self) -> None:
        now = self.loop.time()
        for member in list(self._members):
            member.tick(now)
        self._handle = self.loop.call_later(self.period, self._tick) if self._members else None


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Ticker]] = weakref.WeakKeyDictionary()


def ticker(period: float) -> Ticker:
    """The running loop's ticker of ``period`` seconds."""
    loop = asyncio.get_running_loop()
    of_loop = _tickers.setdefault(loop, {})
    found = of_loop.get(period)
    if found is None:
        found = of_loop[period] = Ticker(loop, period)
    return found


async def within(aw: Awaitable[T], seconds: float) -> T:
    """``aw``, or TimeoutError after ``seconds``: asyncio.timeout where there is one (3.11+: no task of
    its own, as wait_for makes in 3.10 and 3.11), else wait_for."""
    if _TIMEOUT is None:
        return await asyncio.wait_for(aw, seconds)
    async with _TIMEOUT(seconds):
        return await aw


_TIMEOUT = getattr(asyncio, "timeout", None)
