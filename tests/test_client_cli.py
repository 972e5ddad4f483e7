"""client.api and the ``execbroker`` CLI against a live Incus-API server.

The server is taken from, in order: ``$EXECBROKER_TEST_SOCKET`` (+ ``$EXECBROKER_TEST_INSTANCE``, default ``c1``);
an ``exec_target`` fixture returning ``(socket_path, instance)`` (any scope; e.g. in conftest.py
``def exec_target(broker, c1): return str(broker.socket), c1``);
otherwise the tests skip. The instance must be running and have a busybox userland. Against real LXD:
``EXECBROKER_TEST_SOCKET=/var/lib/lxd/unix.socket .venv/bin/pytest tests/test_client_cli.py``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from client.api import Client, ClientError, ExecResult

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")
DEADLINE = 20.0  # seconds any single expected event may take


@dataclass(frozen=True)
class Target:
    socket: str
    instance: str


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Target:
    path = os.environ.get("EXECBROKER_TEST_SOCKET")
    if path:
        instance = os.environ.get("EXECBROKER_TEST_INSTANCE", "c1")
    else:
        try:
            path, instance = request.getfixturevalue("exec_target")
        except pytest.FixtureLookupError:
            pytest.skip("no server: set EXECBROKER_TEST_SOCKET or provide an exec_target fixture")
    if not os.path.exists(path):
        pytest.skip(f"no server socket at {path}")
    return Target(path, instance)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, DEADLINE * 2))


async def _exec(t: Target, argv: list[str], **kwargs: Any) -> tuple[ExecResult, bytes, bytes]:
    out, err = bytearray(), bytearray()
    async with Client(t.socket) as c:
        result = await c.exec(t.instance, argv, stdout_sink=out.extend, stderr_sink=err.extend, **kwargs)
    return result, bytes(out), bytes(err)


# ---- client ------------------------------------------------------------------------------------------------


def test_rest_and_error_envelope(target: Target) -> None:
    async def go() -> None:
        async with Client(target.socket) as c:
            assert (await c.get("/1.0"))["api_version"] == "1.0"
            assert (await c.get(f"/1.0/instances/{target.instance}"))["status"] == "Running"
            with pytest.raises(ClientError) as e:
                await c.get("/1.0/instances/no-such-instance-x")
            assert (e.value.status, e.value.message) == (404, "Instance not found")

    run(go())


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exec_exit_codes(target: Target, code: int) -> None:
    result, _, _ = run(_exec(target, ["sh", "-c", f"exit {code}"]))
    assert (result.return_code, result.error) == (code, "")


def test_exec_stdout_stderr_separate(target: Target) -> None:
    result, out, err = run(_exec(target, ["sh", "-c", "echo out; echo err >&2; printf '\\377\\000'"]))
    assert (result.return_code, out, err) == (0, b"out\n\xff\x00", b"err\n")
    assert (result.stdout_bytes, result.stderr_bytes) == (6, 4)


def test_exec_stdin_binary_exact(target: Target) -> None:
    data = os.urandom(4 << 20)
    result, out, _ = run(_exec(target, ["md5sum"], stdin=data))
    assert result.return_code == 0
    assert out.split()[0].decode() == hashlib.md5(data).hexdigest()


def test_exec_stdin_iterator_roundtrip_and_counting(target: Target) -> None:
    data = os.urandom(3 << 20)

    async def chunks() -> Any:
        for i in range(0, len(data), 100_003):  # odd sizes: frames must not be merged or padded
            yield data[i:i + 100_003]

    result, out, _ = run(_exec(target, ["cat"], stdin=chunks()))
    assert result.return_code == 0 and out == data

    async def discard() -> ExecResult:
        async with Client(target.socket) as c:
            return await c.exec(target.instance, ["head", "-c", "5000000", "/dev/zero"])

    assert run(discard()).stdout_bytes == 5_000_000


def test_exec_missing_command(target: Target) -> None:
    result, _, _ = run(_exec(target, ["no-such-command-x"]))
    assert (result.return_code, result.error) == (127, "Command not found")


def test_exec_env_cwd(target: Target) -> None:
    result, out, _ = run(_exec(target, ["sh", "-c", "echo $BEST_BAND; pwd"], env={"BEST_BAND": "meshuggah"},
                               cwd="/tmp"))
    assert (result.return_code, out) == (0, b"meshuggah\n/tmp\n")


async def _wait_for(buf: bytearray, needle: bytes) -> None:
    deadline = time.monotonic() + DEADLINE
    while needle not in buf:
        assert time.monotonic() < deadline, f"{needle!r} not seen in {bytes(buf)!r}"
        await asyncio.sleep(0.01)


def test_exec_signal_via_handle(target: Target) -> None:
    async def go() -> ExecResult:
        out = bytearray()
        async with Client(target.socket) as c:
            s = await c.exec_start(target.instance, ["sh", "-c", TRAP_TERM], stdout_sink=out.extend)
            await _wait_for(out, b"ready")
            assert await s.signal(signal.SIGTERM)
            return await s.wait()

    assert run(go()).return_code == 42


def test_exec_interactive_resize_via_handle(target: Target) -> None:
    async def go() -> tuple[ExecResult, bytes]:
        out = bytearray()
        async with Client(target.socket) as c:
            s = await c.exec_start(target.instance, ["sh", "-c", TRAP_WINCH], interactive=True, width=80,
                                   height=24, stdout_sink=out.extend)
            await _wait_for(out, b"24 80")
            assert await s.resize(100, 30)
            return await s.wait(), bytes(out)

    result, out = run(go())
    assert result.return_code == 0 and b"30 100" in out


def test_events_see_exec_operation(target: Target) -> None:
    async def go() -> None:
        async with Client(target.socket) as c:
            async with await c.events(["operation"]) as events:
                session = await c.exec_start(target.instance, ["true"])
                await session.wait()
                async for event in events:
                    op = event["metadata"]
                    if op["id"] == session.operation_id and op["status_code"] >= 200:
                        assert (op["status"], op["metadata"]["return"]) == ("Success", 0)
                        return

    run(go())


# ---- CLI ---------------------------------------------------------------------------------------------------

TRAP_TERM = 'trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done'
TRAP_WINCH = 'trap "stty size; exit 0" WINCH; stty size; while :; do sleep 0.1; done'  # trap set before the size shows


def cli(t: Target, *args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", "--socket", t.socket, *args]


def run_cli(t: Target, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cli(t, *args), input=stdin, capture_output=True, timeout=DEADLINE * 2)


@pytest.mark.parametrize("argv,code", [(["true"], 0), (["false"], 1), (["sh", "-c", "exit 9"], 9)])
def test_cli_exit_codes(target: Target, argv: list[str], code: int) -> None:
    assert run_cli(target, "exec", target.instance, "--", *argv).returncode == code


def test_cli_command_without_separator(target: Target) -> None:
    p = run_cli(target, "exec", target.instance, "echo", "hi")
    assert (p.returncode, p.stdout) == (0, b"hi\n")


def test_cli_stdout_stderr_and_options_after_separator(target: Target) -> None:
    p = run_cli(target, "exec", target.instance, "--env", "A=1", "--cwd", "/tmp", "--",
                "sh", "-c", 'echo "$A -- $(pwd)"; echo e >&2; exit 3', "--")
    assert (p.returncode, p.stdout, p.stderr) == (3, b"1 -- /tmp\n", b"e\n")


def test_cli_stdin_binary_exact(target: Target) -> None:
    data = os.urandom(3 << 20)
    p = run_cli(target, "exec", target.instance, "--", "md5sum", stdin=data)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()
    p = run_cli(target, "exec", target.instance, "--", "cat", stdin=data)
    assert p.returncode == 0 and p.stdout == data


def test_cli_stdin_from_regular_file(target: Target, tmp_path: Any) -> None:
    f = tmp_path / "in"
    f.write_bytes(b"abc\x00\xff" * 1000)
    with f.open("rb") as fh:
        p = subprocess.run(cli(target, "exec", target.instance, "--", "md5sum"), stdin=fh,
                           capture_output=True, timeout=DEADLINE)
    assert p.stdout.split()[0].decode() == hashlib.md5(f.read_bytes()).hexdigest()


def test_cli_disable_stdin_does_not_wait_for_our_stdin(target: Target) -> None:
    with subprocess.Popen(cli(target, "exec", "-n", target.instance, "--", "cat"), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as p:
        try:
            out, _ = p.communicate(timeout=DEADLINE)  # stdin stays open until then: -n must not read it
        finally:
            p.kill()
    assert (p.returncode, out) == (0, b"")


@pytest.mark.parametrize("argv,code,message", [
    (["no-such-command-x"], 127, b"Error: Command not found\n"),
    (["/root"], 126, b"Error: Command not executable\n"),
])
def test_cli_exec_error(target: Target, argv: list[str], code: int, message: bytes) -> None:
    p = run_cli(target, "exec", target.instance, "--", *argv)
    assert (p.returncode, p.stdout, p.stderr) == (code, b"", message)


def test_cli_errors(target: Target) -> None:
    p = run_cli(target, "start", "no-such-instance-x")
    assert (p.returncode, p.stderr) == (1, b"Error: Instance not found\n")
    p = subprocess.run([sys.executable, "-m", "client.cli", "--socket", "/nonexistent/sock", "list"],
                       capture_output=True, timeout=DEADLINE)
    assert p.returncode == 1 and p.stderr.startswith(b"Error: ")


def test_cli_signal_forwarding(target: Target) -> None:
    with subprocess.Popen(cli(target, "exec", "-T", target.instance, "--", "sh", "-c", TRAP_TERM),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout is not None
            assert p.stdout.readline() == b"ready\n"
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=DEADLINE) == 42
        finally:
            p.kill()


def test_cli_dies_of_sigpipe_when_its_reader_goes(target: Target) -> None:
    with subprocess.Popen(cli(target, "exec", target.instance, "--", "yes"), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout is not None
            assert p.stdout.read(2) == b"y\n"
            p.stdout.close()  # `| head -1`
            assert p.wait(timeout=DEADLINE) == -signal.SIGPIPE
        finally:
            p.kill()


def test_cli_list(target: Target) -> None:
    p = run_cli(target, "list")
    assert p.returncode == 0
    rows = [line.split() for line in p.stdout.decode().splitlines()]
    assert rows[0] == ["NAME", "STATUS", "LOCATION"]
    assert [target.instance, "Running"] in [r[:2] for r in rows[1:]]


def test_cli_instance_lifecycle(target: Target) -> None:
    name = "ebtest-" + uuid.uuid4().hex[:8]

    def status() -> str:
        rows = [line.split() for line in run_cli(target, "list").stdout.decode().splitlines()]
        return next((r[1] for r in rows if r[0] == name), "absent")

    try:
        assert run_cli(target, "launch", name).returncode == 0
        assert status() == "Running"
        assert run_cli(target, "exec", name, "--", "true").returncode == 0
        assert run_cli(target, "freeze", name).returncode == 0
        assert status() == "Frozen"
        assert run_cli(target, "unfreeze", name).returncode == 0
        p = run_cli(target, "delete", name)
        assert p.returncode == 1 and p.stderr.startswith(b"Error: ")  # still running
        assert run_cli(target, "stop", "--force", name).returncode == 0
        assert status() == "Stopped"
        assert run_cli(target, "start", name).returncode == 0
        assert run_cli(target, "delete", "--force", name).returncode == 0
        assert status() == "absent"
    finally:
        run_cli(target, "delete", "--force", name)


# ---- CLI under a pseudo terminal ---------------------------------------------------------------------------


class PtyProcess:
    """A child running on a fresh pseudo terminal (its controlling tty) of a given size."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # child: size the terminal before the CLI reads it
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        self.pid, self.fd, self.output, self.status = pid, fd, bytearray(), None

    def _pump(self, timeout: float) -> bool:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError as e:  # EIO: the child side is closed
                if e.errno != errno.EIO:
                    raise
                chunk = b""
            self.output += chunk
            return bool(chunk)
        return True

    def expect(self, needle: bytes, start: int = 0) -> int:
        deadline = time.monotonic() + DEADLINE
        while (i := self.output.find(needle, start)) < 0:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self._pump(remaining), f"{needle!r} not in {bytes(self.output)!r}"
        return i + len(needle)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def slave_attrs(self) -> list[Any]:
        slave = os.open(os.readlink(f"/proc/{self.pid}/fd/0"), os.O_RDWR | os.O_NOCTTY)
        try:
            return termios.tcgetattr(slave)
        finally:
            os.close(slave)

    def wait(self) -> int:
        """Exit status, once the child has exited and all its output is read (EOF on the master)."""
        deadline = time.monotonic() + DEADLINE
        eof = False
        while self.status is None or not eof:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no exit/EOF; output {bytes(self.output)!r}"
            if eof:
                time.sleep(0.01)
            else:
                eof = not self._pump(min(remaining, 0.05))
            if self.status is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[PtyProcess] = []

    def start(argv: list[str], **kw: int) -> PtyProcess:
        procs.append(PtyProcess(argv, **kw))
        return procs[-1]

    yield start
    for p in procs:
        p.close()


def test_cli_tty_interactive(target: Target, spawn: Any) -> None:
    p = spawn(cli(target, "exec", target.instance, "--", "sh", "-c", 'tty; stty size; echo "T=$TERM"; exit 3'),
              rows=33, cols=101)
    assert p.wait() == 3
    assert b"/dev/pts/" in p.output and b"33 101" in p.output and b"T=" in p.output


def test_cli_tty_forced_under_pty_with_t(target: Target, spawn: Any) -> None:
    p = spawn(cli(target, "exec", "-t", target.instance, "--", "sh", "-c", "tty"))
    assert p.wait() == 0 and b"/dev/pts/" in p.output
    p = spawn(cli(target, "exec", "-T", target.instance, "--", "sh", "-c", "tty"))
    assert p.wait() == 1 and b"not a tty" in p.output


def test_cli_tty_window_resize(target: Target, spawn: Any) -> None:
    p = spawn(cli(target, "exec", target.instance, "--", "sh", "-c", TRAP_WINCH))
    p.expect(b"24 80")
    p.resize(30, 100)  # SIGWINCH to the CLI → window-resize → SIGWINCH in the instance
    p.expect(b"30 100")
    assert p.wait() == 0


def test_cli_tty_raw_mode_and_ctrl_c_is_a_byte(target: Target, spawn: Any) -> None:
    script = 'trap "exit 42" INT; echo ready; while :; do sleep 0.1; done'
    p = spawn(cli(target, "exec", target.instance, "--", "sh", "-c", script))
    p.expect(b"ready")
    lflag = p.slave_attrs()[3]
    assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw while running
    os.write(p.fd, b"\x03")  # raw mode: goes to the remote PTY, whose line discipline makes it SIGINT
    assert p.wait() == 42


@pytest.mark.parametrize("instance,argv,code", [(None, ["sh", "-c", "exit 5"], 5),
                                               ("no-such-instance-x", ["true"], 1)])
def test_cli_tty_restores_terminal(target: Target, spawn: Any, instance: str | None, argv: list[str],
                                   code: int) -> None:
    inner = " ".join(f"'{a}'" for a in cli(target, "exec", instance or target.instance, "--", *argv))
    p = spawn(["/bin/sh", "-c", f"stty -g; {inner}; echo rc=$?; stty -g"])
    assert p.wait() == 0
    lines = bytes(p.output).replace(b"\r", b"").split(b"\n")
    settings = [line for line in lines if line.count(b":") > 10]
    assert f"rc={code}".encode() in p.output and len(settings) == 2 and settings[0] == settings[1]


def test_cli_tty_signal_forwarding(target: Target, spawn: Any) -> None:
    p = spawn(cli(target, "exec", target.instance, "--", "sh", "-c", TRAP_TERM))
    p.expect(b"ready")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait() == 42
