"""Fixtures and helpers for the instance runtime tests (tests/test_instances.py, tests/test_pid1.py).

Import the fixtures by name into a test module. Every instance lives in a short temporary data dir and a
freezer cgroup parent of its own; ``leak_check`` fails the session if any test's pid1 or cgroup survives.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node_agent.runtime import cgroups
from node_agent.runtime.instances import InstanceManager
from node_agent.runtime.spawn import Process, SpawnRequest
from tests.conftest import processes_mentioning, wait_for  # noqa: F401 - re-exported to the instance tests

CGROUP_PARENT = f"execbroker-test-{os.getpid()}"
DATA_PREFIX = "ebt"  # data dirs are /tmp/ebtXXXX: short, so spawn.sock fits in sun_path
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "LANG": "C.UTF-8", "USER": "root"}
_names = itertools.count()
_data_dirs: list[Path] = []

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None,
                                reason="the oci driver needs root and runc (deploy/system-deps.sh)")


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{next(_names)}"


async def async_wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def read_until_eof(fd: int) -> bytes:
    """Read a non-blocking fd (pipe or PTY master) to EOF (EIO on a PTY whose slaves are all closed)."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                chunk = b""
            if not chunk:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            chunks.append(chunk)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


class Pipes:
    """stdin/stdout/stderr pipes for one spawn; the parent ends stay here, the child ends go to pid1."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()

    @property
    def child_fds(self) -> tuple[int, int, int]:
        return self.stdin_r, self.stdout_w, self.stderr_w

    def close_child_ends(self) -> None:
        for fd in self.child_fds:
            os.close(fd)

    def close_stdin(self) -> None:
        """EOF on the command's stdin. Each fd is closed exactly once: a second close could hit a number
        that another coroutine has since been given."""
        if self.stdin_w >= 0:
            os.close(self.stdin_w)
            self.stdin_w = -1

    def close(self) -> None:
        self.close_stdin()
        for fd in (self.stdout_r, self.stderr_r):
            os.close(fd)
        self.stdout_r = self.stderr_r = -1


async def spawn_piped(manager: InstanceManager, name: str, argv: list[str], **kw: Any) -> tuple[Process, Pipes]:
    env = kw.pop("env", ENV)
    pipes = Pipes()
    try:
        proc = await manager.spawn(name, SpawnRequest(argv=argv, env=env, **kw), pipes.child_fds)
    except BaseException:
        pipes.close_child_ends()
        pipes.close()
        raise
    pipes.close_child_ends()  # the caller closes its copies once spawn() returned
    return proc, pipes


async def run(manager: InstanceManager, name: str, argv: list[str], stdin: bytes = b"",
              timeout: float = 30, **kw: Any) -> tuple[int, str, str]:
    """Run a command to completion: (exit code, stdout, stderr)."""
    proc, pipes = await spawn_piped(manager, name, argv, **kw)
    try:
        os.write(pipes.stdin_w, stdin)
        pipes.close_stdin()
        code, out, err = await asyncio.wait_for(asyncio.gather(
            proc.wait(), read_until_eof(pipes.stdout_r), read_until_eof(pipes.stderr_r)), timeout)
        return code, out.decode(), err.decode()
    finally:
        proc.close()
        pipes.close()


async def cleanup_manager(manager: InstanceManager) -> None:
    for inst in manager.list():
        if inst.status in ("Running", "Frozen"):
            await manager.stop(inst.name, force=True)
        await manager.delete(inst.name)


@pytest.fixture(scope="session", autouse=True)
def leak_check() -> Iterator[None]:
    """At the end of the session: no pid1 of a test instance runs, no test cgroup is left."""
    yield
    leaked = [proc for d in _data_dirs for proc in processes_mentioning(str(d))]
    assert not leaked, f"test instance processes left running: {leaked}"
    leftovers = [p for p in cgroups.remove_tree(CGROUP_PARENT) if p.name != CGROUP_PARENT]
    assert not leftovers, f"test cgroups left behind: {leftovers}"


def new_data_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix=DATA_PREFIX, dir="/tmp"))
    _data_dirs.append(d)
    return d


@pytest.fixture
def data_dir() -> Iterator[Path]:
    d = new_data_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def manager(data_dir: Path) -> AsyncIterator[InstanceManager]:
    m = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    m.adopt()
    try:
        yield m
    finally:
        await cleanup_manager(m)


@pytest.fixture
async def c1(manager: InstanceManager) -> str:
    """A running busybox instance."""
    name = unique_name()
    manager.create(name)
    await manager.start(name)
    return name
