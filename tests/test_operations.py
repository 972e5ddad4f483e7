"""Operation state machine, rendering, registry retention and waiting; the events hub."""

from __future__ import annotations

import asyncio
import json

import pytest

from core.errors import ApiError, BadRequest, NotFound
from core.events import EventHub
from core.identity import Identity
from core.operations import OperationRegistry, Status, render

WHO = Identity("root", "unix")


def make_registry(retention: float = 0.2) -> tuple[OperationRegistry, list[dict[str, object]]]:
    seen: list[dict[str, object]] = []
    return OperationRegistry("none", lambda op: seen.append(render(op)), retention), seen


async def test_lifecycle_events_and_render() -> None:
    reg, seen = make_registry()
    op = reg.create("task", "Executing command", {"instances": ["/1.0/instances/c1"]}, {}, WHO)

    async def run(o: object) -> None:
        op.extend_metadata({"return": 0})

    reg.start(op, run)
    await reg.wait(op.id, 5)
    assert [s["status"] for s in seen] == ["Pending", "Running", "Running", "Success"]
    final = seen[-1]
    assert final["metadata"] == {"return": 0} and final["status_code"] == 200 and final["err"] == ""
    assert set(final) == {"id", "class", "description", "created_at", "updated_at", "status", "status_code",
                          "resources", "metadata", "may_cancel", "err", "location"}
    assert final["created_at"].endswith("+00:00")


async def test_failure_text_and_retention() -> None:
    reg, _ = make_registry(retention=0.1)
    op = reg.create("task", "x", {}, {}, WHO)

    async def run(o: object) -> None:
        raise ApiError("Command not found")

    reg.start(op, run)
    done = await reg.wait(op.id, 5)
    assert done.status == Status.FAILURE and done.err == "Command not found"
    deadline = asyncio.get_running_loop().time() + 5
    while reg.list() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    with pytest.raises(NotFound):
        reg.get(op.id)


async def test_wait_timeout_returns_current_state() -> None:
    reg, _ = make_registry()
    op = reg.create("websocket", "x", {}, {}, WHO, may_cancel=True)
    gate = asyncio.Event()

    async def run(o: object) -> None:
        await gate.wait()

    async def cancel() -> None:
        gate.set()

    reg.start(op, run, cancel)
    assert (await reg.wait(op.id, 0.05)).status == Status.RUNNING
    await reg.cancel(op.id)
    assert (await reg.wait(op.id, 5)).status == Status.CANCELLED
    with pytest.raises(BadRequest):
        await reg.cancel(op.id)
    await reg.close()


async def test_not_cancellable() -> None:
    reg, _ = make_registry()
    op = reg.create("task", "x", {}, {}, WHO, may_cancel=False)
    gate = asyncio.Event()

    async def run(o: object) -> None:
        await gate.wait()

    reg.start(op, run)
    with pytest.raises(BadRequest, match="can't be cancelled"):
        await reg.cancel(op.id)
    gate.set()
    await reg.wait(op.id, 5)
    await reg.close()


def test_illegal_transition() -> None:
    from core.operations import Operation
    op = Operation("task", "x", {}, {}, WHO, "none")
    with pytest.raises(ValueError):
        op.transition(Status.SUCCESS)


async def test_hub_order_filter_and_overflow() -> None:
    hub = EventHub()
    ops = hub.subscribe(["operation"])
    other = hub.subscribe(["lifecycle"], project="p2")
    for i in range(5):
        hub.publish("operation", {"i": i})
    hub.publish("lifecycle", {"x": 1})
    got = [json.loads(await ops.next())["metadata"]["i"] for _ in range(5)]  # type: ignore[arg-type]
    assert got == [0, 1, 2, 3, 4]
    assert other.queued == 0  # other project, other type
    from core import events
    slow = hub.subscribe(["operation"])
    for i in range(events.QUEUE_LIMIT + 1):
        hub.publish("operation", {"i": i})
    assert slow.dropped
    while await slow.next() is not None:
        pass
    hub.close()
