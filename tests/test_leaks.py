"""The agent does not leak file descriptors across execs."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.conftest import Broker, wait_for
from tests.wsutil import Raw, run

pytestmark = pytest.mark.broker


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_agent_fds_stable_over_200_execs(broker: Broker, c1: str) -> None:
    pid = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    raw = Raw(broker.socket)

    async def batch(n: int) -> None:
        for i in range(n):
            code, out, _, _ = await run(raw, c1, ["echo", str(i)])
            assert code == 0 and out == f"{i}\n".encode()

    asyncio.run(batch(5))  # warm up: lazily opened fds (Ray, loggers) exist before we count
    before = fd_count(pid)
    asyncio.run(batch(200))
    wait_for(lambda: fd_count(pid) <= before, 10, f"agent fds back to {before} (now {fd_count(pid)})")
