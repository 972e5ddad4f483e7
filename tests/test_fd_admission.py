"""A process takes no more execs than its file descriptors hold (node_agent/execs.py ``_check_room``): past
them a clear 503 instead of failures deep inside (accept, pipe, spawn); and a node's processes hand new
connections to one with room (core/workers.py ``lighter``). Real instance (oci), no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import workers
from core.errors import Unavailable
from core.execspec import parse_exec_post
from core.identity import Identity
from node_agent.runtime.instances import InstanceManager
from node_agent.service import NodeService
from tests.instance_fixtures import c1, data_dir, leak_check, manager  # noqa: F401

WHO = Identity("root", "unix")
SESSION = b'{"command": ["cat"], "wait-for-websocket": true, "interactive": false}'
TASK = b'{"command": ["true"], "wait-for-websocket": false}'


async def test_execs_past_the_file_descriptors_get_a_clear_503(data_dir: Path, manager: InstanceManager,
                                                                c1: str) -> None:
    service = NodeService(data_dir, "t", driver="oci", instances=manager)
    service.execs._fd_budget = 2 * workers.SESSION_FDS  # room for two websocket sessions
    ops = [service.exec("default", c1, parse_exec_post(SESSION), WHO) for _ in range(2)]
    try:
        with pytest.raises(Unavailable, match="No room for another exec in this process: 2 sessions"):
            service.exec("default", c1, parse_exec_post(SESSION), WHO)
        with pytest.raises(Unavailable):  # a task needs one more too
            service.exec("default", c1, parse_exec_post(TASK), WHO)
        await service.cancel_operation(ops[0]["id"], WHO)  # a session ends: room for one again
        await service.wait_operation(ops[0]["id"], 10, WHO)
        ops.append(service.exec("default", c1, parse_exec_post(SESSION), WHO))
    finally:
        for op in ops[1:]:
            await service.cancel_operation(op["id"], WHO)
            await service.wait_operation(op["id"], 10, WHO)
        await service.close()


def test_capacity_from_the_file_descriptor_limit() -> None:
    assert workers.capacity_of(20_000) == (20_000 - workers.FD_RESERVE) // workers.SESSION_FDS
    assert workers.capacity_of(100) == 1  # never none


def test_a_process_at_capacity_hands_new_connections_to_one_with_room() -> None:
    loads = [100, 99, 40]
    assert workers.lighter(0, loads, [0, 1]) is None  # one apart: balanced enough
    assert workers.lighter(0, loads, [0, 1], capacity=100) == 1  # but full: it goes
    assert workers.lighter(1, loads, [0, 1], capacity=99) is None  # the other is full too
    assert workers.lighter(0, loads, [0, 1, 2], capacity=1000) == 2  # the plain rule still applies
