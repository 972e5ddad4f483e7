"""The spawn path: what a command started by pid1 sees, how it ends, and what its exit code says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from core.errors import BadRequest, SpawnError
from node_agent.runtime.instances import InstanceManager
from node_agent.runtime.spawn import SpawnRequest
from tests.instance_fixtures import (  # noqa: F401
    ENV,
    async_wait_for,
    c1,
    data_dir,
    leak_check,
    manager,
    needs_root,
    pid_alive,
    read_until_eof,
    run,
    spawn_piped,
)

pytestmark = [needs_root, pytest.mark.timeout(120)]
FORK_PATH = {"uid": 1000, "gid": 1000}  # another uid: pid1 forks instead of posix_spawn


@pytest.mark.parametrize("argv, code", [
    (["true"], 0),
    (["false"], 1),
    (["sh", "-c", "exit 7"], 7),
    (["no-such-command"], 127),
    (["/no/such/path"], 127),
    (["/root"], 126),  # a directory
    (["/etc/passwd"], 126),  # not executable
    (["sh", "-c", "kill -TERM $$"], 143),
    (["sh", "-c", "kill -HUP $$"], 129),
    (["sh", "-c", "kill -KILL $$"], 137),
])
@pytest.mark.parametrize("path", ["posix_spawn", "fork"])
async def test_exit_codes(manager: InstanceManager, c1: str, argv: list[str], code: int, path: str) -> None:
    kw = FORK_PATH if path == "fork" else {}
    assert (await run(manager, c1, argv, **kw))[0] == code


async def test_stdio_and_stdin(manager: InstanceManager, c1: str) -> None:
    assert await run(manager, c1, ["cat"], stdin=b"hello\n") == (0, "hello\n", "")
    assert await run(manager, c1, ["sh", "-c", "echo out; echo err >&2"]) == (0, "out\n", "err\n")


async def test_environment_is_exactly_the_request(manager: InstanceManager, c1: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "FOO": "bar baz", "EMPTY": ""}
    for kw in ({}, FORK_PATH):
        code, out, _ = await run(manager, c1, ["env"], env=env, **kw)
        assert code == 0
        assert sorted(out.splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


async def test_path_lookup_uses_the_requested_path(manager: InstanceManager, c1: str) -> None:
    assert (await run(manager, c1, ["ls", "/"], env={"PATH": "/nonexistent"}))[0] == 127
    assert (await run(manager, c1, ["ls", "/"], env={}))[0] == 0  # no PATH: execvp's default /bin:/usr/bin


async def test_user_group_and_cwd(manager: InstanceManager, c1: str) -> None:
    assert await run(manager, c1, ["id", "-u"], uid=1000) == (0, "1000\n", "")
    assert await run(manager, c1, ["id", "-g"], gid=1000) == (0, "1000\n", "")
    code, out, _ = await run(manager, c1, ["sh", "-c", "id -u; id -g; id -G; pwd"], uid=1000, gid=1001, cwd="/tmp")
    assert (code, out.split()) == (0, ["1000", "1001", "1001", "/tmp"])
    assert await run(manager, c1, ["pwd"], cwd="/dev") == (0, "/dev\n", "")


async def test_empty_cwd_means_home(manager: InstanceManager, c1: str) -> None:
    assert await run(manager, c1, ["pwd"]) == (0, "/root\n", "")
    assert await run(manager, c1, ["pwd"], env=ENV | {"HOME": "/tmp"}) == (0, "/tmp\n", "")
    assert await run(manager, c1, ["pwd"], env=ENV | {"HOME": "/nope"}) == (0, "/\n", "")
    assert await run(manager, c1, ["pwd"], env={"PATH": "/bin"}) == (0, "/\n", "")


@pytest.mark.parametrize("kw", [{}, FORK_PATH], ids=["posix_spawn", "fork"])
async def test_bad_cwd_is_a_spawn_error(manager: InstanceManager, c1: str, kw: dict[str, int]) -> None:
    with pytest.raises(SpawnError, match="^Failed to change directory to /nope: No such file or directory$"):
        await run(manager, c1, ["pwd"], cwd="/nope", **kw)
    with pytest.raises(SpawnError, match="^Failed to change directory to /etc/passwd: Not a directory$"):
        await run(manager, c1, ["pwd"], cwd="/etc/passwd", **kw)


async def test_permission_denied_cwd_for_a_user(manager: InstanceManager, c1: str) -> None:
    with pytest.raises(SpawnError, match="^Failed to change directory to /root: Permission denied$"):
        await run(manager, c1, ["pwd"], uid=1000, gid=1000, env=ENV | {"HOME": "/tmp"}, cwd="/root")


async def test_empty_argv_is_a_spawn_error(manager: InstanceManager, c1: str) -> None:
    with pytest.raises(SpawnError):
        await run(manager, c1, [])


@pytest.mark.parametrize("kw", [{}, FORK_PATH], ids=["posix_spawn", "fork"])
async def test_clean_process_state(manager: InstanceManager, c1: str, kw: dict[str, int]) -> None:
    """No ignored or blocked signals, a session of its own: nothing of pid1's state leaks into commands."""
    code, out, _ = await run(manager, c1, ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"], **kw)
    assert (code, out.split()) == (0, ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16])
    code, out, _ = await run(manager, c1, ["cut", "-d", " ", "-f1,5,6", "/proc/self/stat"], **kw)
    pid, pgrp, session = out.split()
    assert pid == pgrp == session  # session and process group leader


async def test_fds_are_exactly_stdio(manager: InstanceManager, c1: str) -> None:
    for kw in ({}, FORK_PATH):
        code, out, _ = await run(manager, c1, ["ls", "/proc/self/fd"], **kw)
        assert (code, sorted(out.split())) == (0, ["0", "1", "2", "3"])  # 3: ls's own directory fd


async def test_signal_reaches_the_main_process(manager: InstanceManager, c1: str) -> None:
    script = 'trap "echo got USR1; exit 3" USR1; echo ready; while :; do sleep 0.05; done'
    proc, pipes = await spawn_piped(manager, c1, ["sh", "-c", script])
    try:
        assert os.read(pipes.stdout_r, 100) == b"ready\n"
        proc.signal(signal.SIGUSR1)
        assert await asyncio.wait_for(proc.wait(), 10) == 3
        assert await read_until_eof(pipes.stdout_r) == b"got USR1\n"
        proc.signal(signal.SIGUSR1)  # after exit: ignored
    finally:
        proc.close()
        pipes.close()


async def test_signal_exit_code(manager: InstanceManager, c1: str) -> None:
    proc, pipes = await spawn_piped(manager, c1, ["sleep", "1000"])
    try:
        proc.signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 143
    finally:
        proc.close()
        pipes.close()


async def test_kill_group_kills_background_children(manager: InstanceManager, c1: str) -> None:
    proc, pipes = await spawn_piped(manager, c1, ["sh", "-c", "sleep 1000 & echo $!; wait"])
    try:
        child = int(os.read(pipes.stdout_r, 100))
        proc.kill_group()
        assert await asyncio.wait_for(proc.wait(), 10) == 137

        async def child_gone() -> bool:
            return (await run(manager, c1, ["kill", "-0", str(child)]))[0] != 0
        for _ in range(500):
            if await child_gone():
                break
            await asyncio.sleep(0.01)
        assert await child_gone()
    finally:
        proc.close()
        pipes.close()


async def test_closing_the_connection_kills_the_command(manager: InstanceManager, c1: str) -> None:
    """The agent died (its connection closed): the command and its process group go too."""
    proc, pipes = await spawn_piped(manager, c1, ["sh", "-c", "sleep 1000 & sleep 1000"])
    try:
        assert proc.host_pid is not None and pid_alive(proc.host_pid)
        proc.close()
        assert await proc.wait() == 137
        await async_wait_for(lambda: not pid_alive(proc.host_pid), 10, "command killed")
        await async_wait_for(lambda: read_until_eof_sync(pipes.stdout_r), 10, "every writer of stdout gone")
    finally:
        pipes.close()


def read_until_eof_sync(fd: int) -> bool:
    """True once the pipe reports EOF (all writers, background children included, are gone)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536) == b""
    except BlockingIOError:
        return False


async def test_host_pid(manager: InstanceManager, c1: str) -> None:
    proc, pipes = await spawn_piped(manager, c1, ["sleep", "1000"])
    try:
        assert proc.host_pid is not None
        with open(f"/proc/{proc.host_pid}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
        assert nspid == [str(proc.host_pid), str(proc.pid)]
    finally:
        proc.close()
        pipes.close()


async def test_orphans_are_reaped(manager: InstanceManager, c1: str) -> None:
    """A command's background child outlives it: reparented to pid1, which reaps it when it dies. The
    orphan lives until the test kills it, so neither step can race its exit (a zombie stays in its
    parent's children list until reaped)."""
    pid1 = manager.get(c1).pid
    code, out, err = await run(manager, c1, ["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
    inner = out.strip()  # the orphan's pid inside the instance
    assert (code, err) == (0, "") and inner.isdigit(), (code, out, err)

    def children_of_pid1() -> list[int]:
        return [int(t) for t in open(f"/proc/{pid1}/task/{pid1}/children").read().split()]

    def inner_pid(host_pid: int) -> str:
        try:
            with open(f"/proc/{host_pid}/status") as f:
                return next(line for line in f if line.startswith("NSpid:")).split()[-1]
        except OSError:  # another child of pid1 that just went
            return ""

    orphan = [p for p in children_of_pid1() if inner_pid(p) == inner]
    assert len(orphan) == 1, (children_of_pid1(), inner)  # the orphaned sleep, reparented to pid1
    os.kill(orphan[0], signal.SIGKILL)
    await async_wait_for(lambda: orphan[0] not in children_of_pid1(), 10, "orphan reaped by pid1")


async def test_concurrent_spawns(manager: InstanceManager, c1: str) -> None:
    results = await asyncio.gather(*(run(manager, c1, ["sh", "-c", f"echo {i}"]) for i in range(50)))
    assert results == [(0, f"{i}\n", "") for i in range(50)]


async def test_large_environment(manager: InstanceManager, c1: str) -> None:
    """300 KB of environment: more than a default socket buffer holds in one message."""
    env = ENV | {f"BIG{i}": str(i) * 100_000 for i in range(3)}  # the kernel allows 128 KiB per string
    code, out, _ = await run(manager, c1, ["sh", "-c", 'echo ${#BIG0} ${#BIG1} ${#BIG2}'], env=env)
    assert (code, out) == (0, "100000 100000 100000\n")


async def test_oversized_argument_is_not_executable(manager: InstanceManager, c1: str) -> None:
    assert (await run(manager, c1, ["echo", "x" * 200_000]))[0] == 126  # E2BIG from execve


@pytest.mark.parametrize("kw", [{}, FORK_PATH], ids=["posix_spawn", "fork"])
async def test_pty(manager: InstanceManager, c1: str, kw: dict[str, int]) -> None:
    """pid1 opens the PTY (sized as asked) and hands back its master: non-blocking, not inheritable."""
    proc = await manager.spawn(c1, SpawnRequest(["sh", "-c", "tty; stty size; test -t 0 && echo isatty; "
                                                "ls -l $(tty) | cut -c1-10"],
                                                ENV, pty=True, width=101, height=33, **kw), ())
    try:
        master = proc.pty_master
        assert master is not None
        assert not os.get_inheritable(master) and not os.get_blocking(master)
        out = (await asyncio.wait_for(read_until_eof(master), 10)).decode()
        assert await proc.wait() == 0
        lines = out.replace("\r", "").split("\n")
        assert lines[0].startswith("/dev/pts/")
        assert lines[1:3] == ["33 101", "isatty"]
        assert lines[3] == "crw--w----"  # owned by the command's user, as a login terminal
    finally:
        proc.close()
        if proc.pty_master is not None:
            os.close(proc.pty_master)


async def test_pty_is_the_controlling_terminal(manager: InstanceManager, c1: str) -> None:
    """Ctrl-C typed on the PTY interrupts the foreground command (needs a controlling terminal)."""
    proc = await manager.spawn(c1, SpawnRequest(["sh", "-c", "echo ready; exec sleep 1000"], ENV, pty=True), ())
    try:
        master = proc.pty_master
        assert master is not None
        await async_wait_for(lambda: _read_some(master).find(b"ready") >= 0, 10, "ready")
        os.write(master, b"\x03")
        assert await asyncio.wait_for(proc.wait(), 10) == 130
    finally:
        proc.close()
        if proc.pty_master is not None:
            os.close(proc.pty_master)


_pty_buffer = bytearray()


def _read_some(fd: int) -> bytes:
    try:
        _pty_buffer.extend(os.read(fd, 4096))
    except (BlockingIOError, OSError):
        pass
    return bytes(_pty_buffer)


async def test_spawn_into_stopped_instance(manager: InstanceManager, c1: str) -> None:
    await manager.stop(c1, force=True)
    with pytest.raises(BadRequest, match="^Instance is not running$"):
        await run(manager, c1, ["true"])


async def test_command_running_when_instance_stops_exits_137(manager: InstanceManager, c1: str) -> None:
    proc, pipes = await spawn_piped(manager, c1, ["sleep", "1000"])
    try:
        await manager.stop(c1, force=True)
        assert await asyncio.wait_for(proc.wait(), 10) == 137
    finally:
        proc.close()
        pipes.close()


async def test_pid1_log_stays_clean(manager: InstanceManager, c1: str, data_dir: Path) -> None:
    """Every path (errors too) runs in the busybox chroot without a late import or an exception in pid1."""
    for argv, kw in ((["true"], {}), (["no-such-command"], {}), (["/root"], FORK_PATH), (["id"], FORK_PATH),
                     (["pwd"], {"cwd": "/nope"}), (["pwd"], {"cwd": "/nope", **FORK_PATH}), ([], {})):
        try:
            await run(manager, c1, argv, **kw)
        except SpawnError:
            pass
    proc, pipes = await spawn_piped(manager, c1, ["sleep", "1000"])
    proc.signal(signal.SIGTERM)
    await proc.wait()
    proc.close()
    pipes.close()
    assert (data_dir / "instances" / c1 / "pid1.log").read_text() == ""


async def test_malformed_requests_are_refused(manager: InstanceManager, c1: str, data_dir: Path) -> None:
    """pid1 answers garbage with an error and keeps serving."""
    path = str(data_dir / "instances" / c1 / "spawn.sock")
    good = json.dumps({"argv": ["true"], "env": ENV}).encode()
    for payload, fds in ((b"not json", [0, 1, 2]), (b"{}", [0, 1, 2]), (good, [0, 1]),
                         (json.dumps({"argv": [], "env": {}}).encode(), [0, 1, 2])):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(10)
            sock.connect(path)
            socket.send_fds(sock, [payload], fds)
            assert "Invalid spawn request" in json.loads(sock.recv(4096))["error"]
            assert sock.recv(4096) == b""  # then it hangs up
    assert await run(manager, c1, ["echo", "still serving"]) == (0, "still serving\n", "")
