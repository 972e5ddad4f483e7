"""asyncio helpers without IO."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Coroutine
from typing import Any


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
