"""Bounded memory of event delivery (no Ray): each events listener bounded in events and in bytes, a slow
one dropped with a reason and its queue released; a peer member's outbox bounded in batches and bytes."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Close

from broker.event_outbox import EventOutbox
from client.api import EventsClosed, EventStream
from core.events import QUEUE_BYTES, EventHub, Listener


def frame(n: int) -> str:
    return "x" * n


def test_a_listener_past_its_bytes_is_dropped_and_released() -> None:
    listener = Listener(frozenset({"operation"}), None, max_bytes=1000)
    told: list[str] = []
    listener.on_drop = told.append
    for _ in range(3):
        listener.offer(frame(300))
    assert listener.queued == 900 and not listener.closed
    listener.offer(frame(300))  # 1200 > 1000
    assert listener.dropped and listener.closed
    assert listener.reason == "events listener too slow: 900 bytes queued (limit 1000)"
    assert told == [listener.reason]
    assert listener.queued == 0 and not listener._frames  # released at once, not after a reader drains it
    listener.offer(frame(10))
    assert listener.queued == 0 and told == [listener.reason]  # told once; nothing more is taken


async def test_the_reader_gets_the_end_at_once_when_dropped() -> None:
    listener = Listener(frozenset({"operation"}), None, max_bytes=100)
    listener.offer(frame(60))
    listener.offer(frame(60))
    assert await asyncio.wait_for(listener.next(), 5) is None


async def test_a_reader_that_keeps_up_is_never_dropped() -> None:
    listener = Listener(frozenset({"operation"}), None, max_bytes=1000)
    for i in range(100):  # 100 x 600 bytes through a 1000-byte budget
        listener.offer(frame(600) + str(i % 10))
        got = await listener.next()
        assert got is not None and got.endswith(str(i % 10))
    assert not listener.closed and listener.queued == 0


async def test_a_frame_larger_than_the_budget_goes_to_an_idle_listener() -> None:
    listener = Listener(frozenset({"operation"}), None, max_bytes=100)
    listener.offer(frame(500))
    assert not listener.closed and listener.queued == 500
    assert await listener.next() == frame(500)
    listener.offer(frame(500))
    listener.offer(frame(1))  # something queued already: over the budget
    assert listener.dropped and listener.reason == "events listener too slow: 500 bytes queued (limit 100)"


def test_the_event_count_bound_too() -> None:
    listener = Listener(frozenset({"operation"}), None, limit=3)
    for _ in range(4):
        listener.offer(frame(1))
    assert listener.dropped and listener.reason == "events listener too slow: 3 events queued (limit 3)"


async def test_a_normal_close_delivers_what_is_queued() -> None:
    listener = Listener(frozenset({"operation"}), None)
    listener.offer("a")
    listener.offer("b")
    listener.close()
    assert [await listener.next(), await listener.next(), await listener.next()] == ["a", "b", None]
    assert not listener.dropped and listener.reason == ""


async def test_next_waits_for_an_event() -> None:
    listener = Listener(frozenset({"operation"}), None)
    waiting = asyncio.ensure_future(listener.next())
    await asyncio.sleep(0)
    assert not waiting.done()
    listener.offer("e")
    assert await asyncio.wait_for(waiting, 5) == "e"
    waiting = asyncio.ensure_future(listener.next())  # cancelling a wait loses nothing
    await asyncio.sleep(0)
    waiting.cancel()
    listener.offer("f")
    assert await listener.next() == "f"


async def test_the_hub_lets_go_of_a_slow_listener_and_serves_the_others() -> None:
    hub = EventHub(queue_bytes=10_000)
    slow = hub.subscribe(["lifecycle"])
    fast = hub.subscribe(["lifecycle"])
    got = 0
    for i in range(50):
        hub.publish("lifecycle", {"i": i, "pad": "p" * 1000})
        frame = await fast.next()
        assert frame is not None and json.loads(frame)["metadata"]["i"] == i
        got += 1
    assert slow.dropped and slow not in hub._listeners and slow.queued == 0
    assert fast in hub._listeners and not fast.closed and got == 50
    assert slow.reason.startswith("events listener too slow: ") and "(limit 10000)" in slow.reason
    hub.close()


def test_default_bound_is_some_mebibytes() -> None:
    assert 1 << 20 < QUEUE_BYTES <= 64 << 20
    assert EventHub().subscribe(["operation"]).max_bytes == QUEUE_BYTES


def test_outbox_drops_the_oldest_past_its_bytes() -> None:
    outbox = EventOutbox(max_bytes=1000)
    assert [outbox.put(frame(300)) for _ in range(3)] == [0, 0, 0]
    assert outbox.put(frame(300) + "!") == 1  # 1201 > 1000: the oldest goes
    assert len(outbox) == 3 and outbox.bytes == 901


async def test_outbox_keeps_order_and_one_oversized_batch() -> None:
    outbox = EventOutbox(limit=2, max_bytes=100)
    outbox.put("a")
    outbox.put("b")
    outbox.put("c")  # count bound: "a" goes
    assert [await outbox.get(), await outbox.get()] == ["b", "c"]
    assert outbox.put(frame(500)) == 0 and outbox.bytes == 500  # larger than the bound, alone: kept
    assert outbox.put("d") == 1 and outbox.bytes == 1
    waiting = asyncio.ensure_future(outbox.get())
    assert await asyncio.wait_for(waiting, 5) == "d"


class _ClosedWs:
    def __init__(self, code: int, reason: str) -> None:
        self.exc = ConnectionClosedError(Close(code, reason), None)

    async def recv(self) -> str:
        raise self.exc


async def test_the_client_says_why_its_events_stream_was_dropped() -> None:
    stream = EventStream(_ClosedWs(1008, "events listener too slow: 9000000 bytes queued (limit 8388608)"))  # type: ignore[arg-type]
    with pytest.raises(EventsClosed, match="events listener too slow") as info:
        await stream.__anext__()
    assert info.value.code == 1008
    with pytest.raises(StopAsyncIteration):  # a normal end is just the end
        await EventStream(_ClosedWs(1000, "")).__anext__()  # type: ignore[arg-type]
