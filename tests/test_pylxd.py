"""pylxd 2.4.2 against the broker, unmodified."""

from __future__ import annotations

import pytest

from tests.conftest import Broker

pylxd = pytest.importorskip("pylxd")
pytestmark = pytest.mark.broker


@pytest.fixture()
def inst(broker: Broker, c1: str):  # type: ignore[no-untyped-def]
    return pylxd.Client(endpoint=str(broker.socket)).instances.get(c1)


def test_execute_echo(inst) -> None:  # type: ignore[no-untyped-def]
    result = inst.execute(["echo", "hi"])
    assert tuple(result) == (0, "hi\n", "")


def test_stdin_payload(inst) -> None:  # type: ignore[no-untyped-def]
    result = inst.execute(["cat", "-"], stdin_payload="Hello world!\n")
    assert result.exit_code == 0 and result.stdout == "Hello world!\n"


def test_stdout_handler_one_message(inst) -> None:  # type: ignore[no-untyped-def]
    got: list[str] = []
    result = inst.execute(["cat", "-"], stdin_payload="Hello world!\n", stdout_handler=got.append)
    assert got == ["Hello world!\n"] and result.stdout == ""


def test_non_utf8_bytes(inst) -> None:  # type: ignore[no-untyped-def]
    result = inst.execute(["printf", "\\377"], decode=None)
    assert result.stdout == b"\xff"
    result = inst.execute(["printf", "qu\\351"], encoding="latin1")
    assert result.stdout == "qu\xe9"


def test_user_group_cwd_and_env(inst) -> None:  # type: ignore[no-untyped-def]
    result = inst.execute(["sh", "-c", "id -u; pwd; echo $X"], environment={"X": "y"}, user=1000, cwd="/tmp")
    assert result.stdout.split() == ["1000", "/tmp", "y"]


def test_missing_command_raises(inst) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pylxd.exceptions.LXDAPIException, match="Command not found"):
        inst.execute(["no-such-command"])
