"""The real `lxc` client (Debian lxd-client) against the broker, unmodified."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import shutil
import struct
import subprocess
import termios
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Broker, read_pty

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(shutil.which("lxc") is None, reason="lxd-client not installed (make test installs it)")]


@pytest.mark.parametrize("script, code", [("true", 0), ("false", 1), ("exit 7", 7)])
def test_exit_codes(broker: Broker, c1: str, script: str, code: int) -> None:
    assert broker.lxc("exec", c1, "--", "sh", "-c", script).returncode == code


@pytest.mark.parametrize("command, code, text", [
    (["/root"], 126, "Error: Command not executable"),
    (["no-such-command"], 127, "Error: Command not found"),
])
def test_failures(broker: Broker, c1: str, command: list[str], code: int, text: str) -> None:
    r = broker.lxc("exec", c1, "--", *command)
    assert r.returncode == code and text in r.stderr.decode()


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("KILL", 137)])
def test_killed_inside(broker: Broker, c1: str, sig: str, code: int) -> None:
    r = broker.lxc("exec", c1, "--", "sh", "-c", f"kill -{sig} $$; sleep 10")
    assert r.returncode == code


def test_output_and_stderr(broker: Broker, c1: str) -> None:
    r = broker.lxc("exec", c1, "--", "sh", "-c", "echo hi; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"hi\n", b"err\n")


def test_stdin_binary_exact_10mib(broker: Broker, c1: str) -> None:
    data = os.urandom(10 << 20)
    r = broker.lxc("exec", c1, "--", "md5sum", input=data)
    assert r.returncode == 0 and r.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


def test_stdout_binary_exact(broker: Broker, c1: str) -> None:
    data = os.urandom(4 << 20)
    r = broker.lxc("exec", c1, "--", "cat", input=data)
    assert r.stdout == data


def test_env_cwd_user_group(broker: Broker, c1: str) -> None:
    r = broker.lxc("exec", c1, "--env", "BEST_BAND=meshuggah", "--cwd", "/tmp", "--user", "1000",
                   "--group", "1000", "--", "sh", "-c", "echo $BEST_BAND; pwd; id -u; id -g")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["meshuggah", "/tmp", "1000", "1000"]
    assert broker.lxc("exec", c1, "--", "pwd").stdout == b"/root\n"


def test_force_noninteractive(broker: Broker, c1: str) -> None:
    r = broker.lxc("exec", "-T", c1, "--", "sh", "-c", "tty; echo x")
    assert r.stdout.endswith(b"x\n") and b"not a tty" in r.stdout


def test_force_interactive_under_pty(broker: Broker, c1: str) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 101, 0, 0))
    proc = subprocess.Popen(["lxc", "exec", "-t", c1, "--", "sh", "-c", "tty; stty size; exit 5"],
                            stdin=slave, stdout=slave, stderr=slave, env=broker.env, start_new_session=True)
    os.close(slave)
    try:
        out = read_pty(master, None, 30)
        assert proc.wait(30) == 5
    finally:
        proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert "/dev/pts/" in text and "37 101" in text


def test_list_shows_running(broker: Broker, c1: str) -> None:
    r = broker.lxc("list", "--format", "csv", "-c", "ns")
    assert r.returncode == 0, r.stderr
    assert "c1,RUNNING" in r.stdout.decode()
    r = broker.lxc("list")  # the default columns need state and snapshots: the "full" instance path
    assert r.returncode == 0 and "| c1   | RUNNING |" in r.stdout.decode(), r.stdout + r.stderr


def test_concurrent_no_hang(broker: Broker, c1: str) -> None:
    """20 concurrent `lxc exec`, 30 rounds: every call returns, with the right output."""

    def one(i: int) -> bool:
        r = broker.lxc("exec", c1, "--", "sh", "-c", f"echo abc{i}", timeout=120)
        return r.returncode == 0 and r.stdout == f"abc{i}\n".encode()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20 * 30)))
    assert all(results), f"{results.count(False)} of {len(results)} failed"


def test_stdin_integrity_repeated(broker: Broker, c1: str) -> None:
    for i in range(10):
        r = broker.lxc("exec", c1, "--", "cat", input=f"abc{i}\n".encode())
        assert r.stdout == f"abc{i}\n".encode()
