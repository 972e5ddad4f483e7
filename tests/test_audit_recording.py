"""Extensions ``exec_audit`` (one record per exec, served at /1.0/audit) and ``exec_recording`` (an
interactive session kept as an asciicast v2 file, served like the exec-output files)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.conftest import BIN, Broker
from tests.wsutil import Raw, read_stream, run

pytestmark = pytest.mark.broker


async def test_one_audit_record_per_exec(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    code, _, _, final = await run(raw, c1, ["sh", "-c", "cat; echo done; exit 4"], stdin=b"12345")
    assert code == 4
    records = broker.api("GET", "/1.0/audit?limit=50")["metadata"]
    mine = [r for r in records if r["operation"] == final["id"]]
    assert len(mine) == 1, records
    record = mine[0]
    assert (record["instance"], record["project"], record["command"], record["mode"]) == \
        (c1, "default", ["sh", "-c", "cat; echo done; exit 4"], "websocket")
    assert (record["status"], record["return"], record["bytes_in"], record["bytes_out"]) == \
        ("Success", 4, 5, len(b"12345done\n"))
    assert record["requestor"]["protocol"] == "unix" and record["requestor"]["username"] == "root"
    assert record["started_at"] <= record["ended_at"] and record["member"]
    r = await raw.post_exec(c1, {"command": ["no-such-command"], "wait-for-websocket": False})
    failed = await raw.wait(r.json()["metadata"]["id"])
    task = [x for x in broker.api("GET", "/1.0/audit?limit=5")["metadata"] if x["operation"] == failed["id"]]
    assert task and (task[0]["mode"], task[0]["return"], task[0]["error"]) == ("task", 127, "Command not found")
    assert broker.api("GET", "/1.0/audit?limit=0")["error_code"] == 400
    assert broker.api("GET", "/1.0/audit?project=nope")["error_code"] == 404


async def test_interactive_session_recorded_as_asciicast(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sh", "-c", "read line; echo \"got $line\"; exit 2"], interactive=True,
                           width=100, height=30, **{"record-session": True, "environment": {"TERM": "xterm"}})
    url = op["metadata"]["recording"]
    assert url.startswith(f"/1.0/instances/{c1}/logs/exec-output/exec_") and url.endswith(".cast")
    ctl = await raw.connect(op, "control")
    s0 = await raw.connect(op, "0")
    await ctl.send(json.dumps({"command": "window-resize", "args": {"width": "120", "height": "40"}}))
    await s0.send(b"secret\n")
    output = await asyncio.wait_for(read_stream(s0), 30)
    final = await raw.wait(op["id"])
    await s0.close()
    await ctl.close()
    assert final["metadata"]["return"] == 2 and b"got secret" in output
    with broker.http() as c:
        cast = c.get(url)
        listed = c.get(f"/1.0/instances/{c1}/logs/exec-output").json()["metadata"]
    assert cast.status_code == 200 and url in listed
    lines = [json.loads(line) for line in cast.text.splitlines()]
    header, events = lines[0], lines[1:]
    assert (header["version"], header["width"], header["height"], header["env"]) == (2, 100, 30, {"TERM": "xterm"})
    assert header["command"] == "sh -c 'read line; echo \"got $line\"; exit 2'"
    assert all(isinstance(t, float | int) and kind in ("o", "r") for t, kind, _ in events)
    assert [e[2] for e in events if e[1] == "r"] == ["120x40"]
    assert "got secret" in "".join(e[2] for e in events if e[1] == "o")
    assert not any(e[1] == "i" for e in events)  # input is kept only with record-stdin
    times = [e[0] for e in events]
    assert times == sorted(times)
    with broker.http() as c:
        assert c.delete(url).status_code == 200


async def test_recording_input_on_request_and_only_for_websocket_execs(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["head", "-c", "3"], interactive=True,
                           **{"record-session": True, "record-stdin": True})
    ctl = await raw.connect(op, "control")
    s0 = await raw.connect(op, "0")
    await s0.send(b"abc\n")  # a terminal hands over a line at a time
    await asyncio.wait_for(read_stream(s0), 30)
    await raw.wait(op["id"])
    await s0.close()
    await ctl.close()
    with broker.http() as c:
        events = [json.loads(line) for line in c.get(op["metadata"]["recording"]).text.splitlines()[1:]]
        c.delete(op["metadata"]["recording"])
    assert "".join(e[2] for e in events if e[1] == "i") == "abc\n"
    r = await raw.post_exec(c1, {"command": ["true"], "wait-for-websocket": False, "record-session": True})
    assert r.status_code == 400 and "record-session" in r.json()["error"]


def test_cli_record(broker: Broker, c1: str) -> None:
    r = subprocess.run([str(BIN / "execbroker"), "exec", "-T", "--record", c1, "--", "echo", "recorded"],
                       env=broker.env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0 and r.stdout == b"recorded\n", r
    url = r.stderr.decode().split("Recorded: ")[1].strip()
    with broker.http() as c:
        lines = c.get(url).text.splitlines()
        c.delete(url)
    assert json.loads(lines[0])["version"] == 2 and json.loads(lines[1])[1:] == ["o", "recorded\n"]
