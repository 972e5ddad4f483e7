"""Extension ``exec_timeout``: an exec's ``timeout`` (seconds) stops the command's whole process group
(SIGTERM, SIGKILL after a grace), ends the operation Failure with exit 124, in every mode."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, Broker
from tests.wsutil import Raw, run

pytestmark = pytest.mark.broker


def processes(broker: Broker, c1: str) -> str:
    return broker.lxc("exec", c1, "--", "ps", "-o", "args").stdout.decode()


async def test_websocket_exec_times_out(broker: Broker, c1: str) -> None:
    code, out, _, final = await run(Raw(broker.socket), c1, ["sh", "-c", "echo started; sleep 100 & sleep 101"],
                                    timeout=2)
    assert (code, out) == (124, b"started\n")
    assert final["status"] == "Failure" and final["err"] == "Command timed out after 2 s"
    assert "sleep 10" not in processes(broker, c1)  # the whole group went, the background sleep too


async def test_a_command_ignoring_sigterm_is_killed_after_the_grace(broker: Broker, c1: str) -> None:
    code, _, _, final = await run(Raw(broker.socket), c1, ["sh", "-c", "trap '' TERM; sleep 102; sleep 103"],
                                  timeout=1)
    assert code == 124 and final["err"] == "Command timed out after 1 s"
    assert "sleep 10" not in processes(broker, c1)


async def test_task_exec_times_out(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    r = await raw.post_exec(c1, {"command": ["sleep", "104"], "wait-for-websocket": False, "timeout": 1.5})
    assert r.status_code == 202, r.text
    final = await raw.wait(r.json()["metadata"]["id"], 20)
    assert final["status"] == "Failure" and final["metadata"]["return"] == 124
    assert final["err"] == "Command timed out after 1.5 s"


async def test_a_command_that_ends_in_time_is_not_touched(broker: Broker, c1: str) -> None:
    code, out, _, final = await run(Raw(broker.socket), c1, ["sh", "-c", "echo quick; exit 3"], timeout=30)
    assert (code, out, final["status"]) == (3, b"quick\n", "Success")


@pytest.mark.parametrize("bad", [0, -1, "soon", 31 * 86400])
async def test_bad_timeouts_are_refused(broker: Broker, c1: str, bad: object) -> None:
    r = await Raw(broker.socket).post_exec(c1, {"command": ["true"], "wait-for-websocket": True, "timeout": bad})
    assert r.status_code == 400 and r.json()["error_code"] == 400, r.text


def test_cli_timeout(broker: Broker, c1: str) -> None:
    r = subprocess.run([str(BIN / "execbroker"), "exec", "--timeout", "1", c1, "--", "sleep", "105"], check=False,
                       env=broker.env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 124 and b"Error: Command timed out after 1 s" in r.stderr, r
    assert "exec_timeout" in broker.api("GET", "/1.0")["metadata"]["api_extensions"]
