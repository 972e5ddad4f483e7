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


def pty_count() -> int:
    """PTYs open on the whole host (every devpts instance, the instances' own included)."""
    with open("/proc/sys/kernel/pty/nr") as f:
        return int(f.read())


def test_refused_and_interactive_execs_leak_no_fd_or_pty(broker: Broker, c1: str) -> None:
    """NUL bytes and oversized terminal sizes are refused at the API (400) before anything is spawned;
    interactive execs give their PTY back. Agent fds and host PTYs are where they were."""
    pid = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    bad = [{"command": ["echo", "a\0b"]}, {"command": ["echo"], "environment": {"A": "x\0"}},
           {"command": ["pwd"], "cwd": "/\0"}, {"command": ["sh"], "interactive": True, "width": 65536},
           {"command": ["sh"], "interactive": True, "height": 100000, "width": 80}]
    assert broker.lxc("exec", "--force-interactive", c1, "--", "true").returncode == 0  # warm up
    fds, ptys = fd_count(pid), pty_count()
    with broker.http() as c:
        for _ in range(20):
            for body in bad:
                r = c.post(f"/1.0/instances/{c1}/exec", json={"wait-for-websocket": True, **body})
                assert r.status_code == 400 and r.json()["type"] == "error", r.text
    for _ in range(10):
        r = broker.lxc("exec", "--force-interactive", c1, "--", "sh", "-c", "tty")
        assert r.returncode == 0 and r.stdout.startswith(b"/dev/pts/"), r
    wait_for(lambda: fd_count(pid) <= fds, 10, f"agent fds back to {fds} (now {fd_count(pid)})")
    wait_for(lambda: pty_count() <= ptys, 10, f"host PTYs back to {ptys} (now {pty_count()})")
