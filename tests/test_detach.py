"""Extension ``exec_detach``: a detachable exec runs on without clients; its output is kept per stream
(bounded) and a reattach with ``?offset=`` replays from there, then goes live."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.conftest import BIN, Broker
from tests.wsutil import Raw

pytestmark = pytest.mark.broker
COUNT = 300
LINES = "".join(f"line{i}\n" for i in range(COUNT)).encode()
SLOW = ["sh", "-c", f"i=0; while [ $i -lt {COUNT} ]; do echo line$i; i=$((i+1)); sleep 0.005; done"]


async def connect(raw: Raw, op: dict[str, Any], fd: str, offset: int | None = None) -> ClientConnection:
    from websockets.asyncio.client import unix_connect

    secret = op["metadata"]["fds"][fd]
    query = f"secret={secret}" + (f"&offset={offset}" if offset is not None else "")
    return await unix_connect(str(raw.socket), f"ws://eb/1.0/operations/{op['id']}/websocket?{query}",
                              compression=None, max_size=None, ping_interval=None)


async def read_until(ws: ClientConnection, size: int | None = None) -> bytes:
    """Binary frames until ``size`` bytes (None: until the barrier)."""
    out = bytearray()
    while size is None or len(out) < size:
        msg = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(msg, str):
            break
        out += msg
    return bytes(out)


async def test_killed_client_loses_nothing(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, SLOW, detachable=True)
    assert op["metadata"]["detachable"] is True
    first = await connect(raw, op, "1")
    got = await read_until(first, 500)
    first.transport.abort()  # the client dies: no close handshake
    reattach = await connect(raw, op, "1", offset=len(got))
    rest = await read_until(reattach)
    final = await raw.wait(op["id"])
    await reattach.close()
    assert got + rest == LINES  # every byte, once
    assert final["status"] == "Success" and final["metadata"]["return"] == 0


async def test_metadata_and_replay_after_the_end(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sh", "-c", "echo out; echo err >&2; exit 5"], detachable=True)
    final = await raw.wait(op["id"])  # nobody attached: it ran anyway
    assert final["status"] == "Success" and final["metadata"]["return"] == 5
    streams = final["metadata"]["detach"]["streams"]
    assert streams["1"] == {"produced": 4, "earliest": 0, "ended": True} and streams["2"]["produced"] == 4
    out, err = await connect(raw, op, "1"), await connect(raw, op, "2", offset=1)
    assert (await read_until(out), await read_until(err)) == (b"out\n", b"rr\n")
    await out.close()
    await err.close()
    status, body = await raw.handshake_status(
        f"ws://eb/1.0/operations/{op['id']}/websocket?secret={op['metadata']['fds']['0']}")
    assert status == 400 and "only its output" in body["error"]


async def test_overflow_reports_the_earliest_offset(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sh", "-c", "yes 0123456789abcdef | head -c 300000"], detachable=True,
                           **{"buffer-size": 65536})
    final = await raw.wait(op["id"])
    stream = final["metadata"]["detach"]["streams"]["1"]
    assert (stream["produced"], stream["earliest"]) == (300000, 300000 - 65536)
    status, body = await raw.handshake_status(
        f"ws://eb/1.0/operations/{op['id']}/websocket?secret={op['metadata']['fds']['1']}&offset=0")
    assert status == 400 and body["error"] == f"Output before offset {300000 - 65536} is no longer held (asked for 0)"
    ws = await connect(raw, op, "1", offset=stream["earliest"])
    tail = await read_until(ws)
    await ws.close()
    expected = (b"0123456789abcdef\n" * 20000)[:300000][-65536:]
    assert tail == expected


async def test_interactive_shell_left_and_rejoined(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sh"], interactive=True, detachable=True, width=80, height=24)
    ctl, s0 = await connect(raw, op, "control"), await connect(raw, op, "0")
    await s0.send(b"X=$((40+2)); echo set-$X\n")
    seen = b""
    while b"set-42" not in seen:
        seen += await asyncio.wait_for(s0.recv(), 30)
    await s0.close()
    await ctl.close()  # both gone: the shell lives on
    state = json.loads((await raw.get_op(op["id"])).text)["metadata"]
    assert state["status"] == "Running" and state["metadata"]["detach"]["attached"] == []
    produced = state["metadata"]["detach"]["streams"]["0"]["produced"]
    s0 = await connect(raw, op, "0", offset=produced)
    ctl = await connect(raw, op, "control")
    await s0.send(b"echo again-$X; exit 3\n")
    more = b""
    try:
        while True:
            msg = await asyncio.wait_for(s0.recv(), 30)
            if isinstance(msg, str):
                break
            more += msg
    except Exception:  # noqa: BLE001 - the server closes after the barrier
        pass
    final = await raw.wait(op["id"])
    await s0.close()
    await ctl.close()
    assert b"again-42" in more and b"set-42" not in more  # the state kept; nothing replayed twice
    assert final["metadata"]["return"] == 3


async def test_bad_offsets_and_plain_execs(broker: Broker, c1: str) -> None:
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sleep", "30"], detachable=True)
    base = f"ws://eb/1.0/operations/{op['id']}/websocket?secret="
    for query, text in ((f"{op['metadata']['fds']['1']}&offset=99", "beyond"),
                        (f"{op['metadata']['fds']['1']}&offset=-1", "Invalid offset"),
                        (f"{op['metadata']['fds']['control']}&offset=0", "output sockets only")):
        status, body = await raw.handshake_status(base + query)
        assert status == 400 and text in body["error"], body
    async with raw.client() as c:
        await c.delete(f"/1.0/operations/{op['id']}")
    plain = await raw.exec_op(c1, ["true"])
    status, body = await raw.handshake_status(
        f"ws://eb/1.0/operations/{plain['id']}/websocket?secret={plain['metadata']['fds']['1']}&offset=0")
    assert status == 400 and "detachable" in body["error"]
    async with raw.client() as c:
        await c.delete(f"/1.0/operations/{plain['id']}")
        r = await c.post(f"/1.0/instances/{c1}/exec", json={"command": ["true"], "detachable": True})
        assert r.status_code == 400 and "wait-for-websocket" in r.json()["error"]


def test_cli_detach_and_attach(broker: Broker, c1: str, tmp_path: Path) -> None:
    """exec --detach prints the id; attach replays; Ctrl-C (SIGINT) detaches and saves where it stopped;
    the next attach resumes there; the last one ends with the command's exit code."""
    env = {**broker.env, "XDG_STATE_HOME": str(tmp_path)}
    script = "echo first; read go < /tmp/detach-go; echo second; exit 6"
    broker.lxc("exec", c1, "--", "sh", "-c", "rm -f /tmp/detach-go; mkfifo /tmp/detach-go")
    r = subprocess.run([str(BIN / "execbroker"), "exec", "--detach", c1, "--", "sh", "-c", script], env=env,
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r
    op_id = r.stdout.decode().strip()
    attach = subprocess.Popen([str(BIN / "execbroker"), "attach", "--from-start", op_id], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert attach.stdout is not None
    assert attach.stdout.readline() == b"first\n"
    attach.send_signal(signal.SIGINT)
    out, err = attach.communicate(timeout=30)
    assert attach.returncode == 0 and b"Detached from" in err, err
    assert json.loads((tmp_path / "execbroker" / "attach" / f"{op_id}.json").read_text()) == {"1": 6, "2": 0}
    broker.lxc("exec", c1, "--", "sh", "-c", "echo go > /tmp/detach-go")
    again = subprocess.run([str(BIN / "execbroker"), "attach", op_id], env=env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert (again.returncode, again.stdout) == (6, b"second\n"), again  # resumed after "first", not again
    broker.lxc("exec", c1, "--", "rm", "-f", "/tmp/detach-go")


async def test_detachable_with_record_output_keeps_everything(broker: Broker, c1: str) -> None:
    """Past the buffer, the whole output is still in the exec-output files when asked for."""
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sh", "-c", "yes abc | head -c 200000; echo err >&2"], detachable=True,
                           **{"buffer-size": 65536, "record-output": True})
    final = await raw.wait(op["id"])
    urls = final["metadata"]["output"]
    assert final["metadata"]["detach"]["streams"]["1"]["earliest"] == 200000 - 65536
    async with raw.client() as c:
        out, err = (await c.get(urls["1"])).content, (await c.get(urls["2"])).content
        for url in urls.values():
            await c.delete(url)
    assert out == (b"abc\n" * 50000)[:200000] and err == b"err\n"
