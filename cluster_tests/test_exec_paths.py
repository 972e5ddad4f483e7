"""The single-node exec behaviours, parametrized over local (talking to the owner) and forwarded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from tests.conftest import Endpoint
from tests.wsutil import Raw, read_stream, run

INSTANCE = "ic"


@pytest.fixture()
def raw(via: Endpoint) -> Raw:
    return Raw(via.socket)


@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 143),
                                          ("kill -KILL $$", 137)])
async def test_exit_codes(raw: Raw, script: str, code: int) -> None:
    ret, _, _, op = await run(raw, INSTANCE, ["sh", "-c", script])
    assert ret == code and op["status"] == "Success"


async def test_forwarded_operation_names_owner(raw: Raw) -> None:
    op = await raw.exec_op(INSTANCE, ["true"])
    assert op["location"] == "node3"
    socks = [await raw.connect(op, fd) for fd in ("0", "1", "2")]
    final = await raw.wait(op["id"])
    assert final["metadata"]["return"] == 0 and final["location"] == "node3"
    for ws in socks:
        await ws.close()


async def test_command_not_found(raw: Raw) -> None:
    ret, _, _, op = await run(raw, INSTANCE, ["no-such-command"])
    assert ret == 127 and op["status"] == "Failure" and op["err"] == "Command not found"


async def test_binary_exact_both_ways(raw: Raw) -> None:
    data = os.urandom(6 << 20)
    _, out, _, _ = await run(raw, INSTANCE, ["cat"], stdin=data)
    assert hashlib.md5(out).hexdigest() == hashlib.md5(data).hexdigest()


async def test_stderr_and_barrier(raw: Raw) -> None:
    ret, out, err, _ = await run(raw, INSTANCE, ["sh", "-c", "echo out; echo err >&2; exit 2"])
    assert (ret, out, err) == (2, b"out\n", b"err\n")


async def test_interactive_resize_and_signal(raw: Raw) -> None:
    op = await raw.exec_op(INSTANCE, ["sh", "-c", "trap 'stty size; exit 9' USR1; echo ready; while :; do sleep 0.05; done"],
                           interactive=True, width=80, height=24)
    ctl = await raw.connect(op, "control")
    s0 = await raw.connect(op, "0")
    buf = b""
    while b"ready" not in buf:
        buf += await asyncio.wait_for(s0.recv(), 15)
    await ctl.send(json.dumps({"command": "window-resize", "args": {"width": "100", "height": "50"}}))
    await ctl.send(json.dumps({"command": "signal", "signal": 10}))
    buf += await read_stream(s0)
    assert b"50 100" in buf
    assert (await raw.wait(op["id"]))["metadata"]["return"] == 9
    await s0.close()
    await ctl.close()


async def test_record_output(raw: Raw) -> None:
    r = await raw.post_exec(INSTANCE, {"command": ["sh", "-c", "printf hello"], "record-output": True})
    assert r.status_code == 202
    final = await raw.wait(r.json()["metadata"]["id"])
    assert final["metadata"]["return"] == 0
    async with raw.client() as c:
        body = await c.get(final["metadata"]["output"]["1"])
        assert body.content == b"hello"
        assert (await c.delete(final["metadata"]["output"]["1"])).status_code == 200


async def test_error_paths(raw: Raw, via: Endpoint) -> None:
    r = await raw.post_exec(INSTANCE, {"command": ["true"], "record-output": True, "wait-for-websocket": True})
    assert (r.status_code, r.json()["error"]) == (
        400, 'Cannot use "record-output" in combination with "wait-for-websocket"')
    r = await raw.post_exec("nope", {"command": ["true"]})
    assert (r.status_code, r.json()["error"]) == (404, "Instance not found")
    op = await raw.exec_op(INSTANCE, ["cat"])
    status, body = await raw.handshake_status(f"ws://eb/1.0/operations/{op['id']}/websocket?secret={'a' * 64}")
    assert status == 403 and body["error"] == "Forbidden"
    status, body = await raw.handshake_status(f"ws://eb/1.0/operations/{op['id']}/websocket?secret=")
    # spec §4.4: the owner refuses an empty secret with 500 `missing secret`; a member that does not hold
    # the operation refuses it itself, before dialling the owner, with 400 `Missing websocket secret`
    local = via.data_dir.name == "node3"
    assert (status, body["type"], body["error"]) == (
        (500, "error", "missing secret") if local else (400, "error", "Missing websocket secret"))
    async with raw.client() as c:
        assert (await c.delete(f"/1.0/operations/{op['id']}")).status_code == 200
    assert (await raw.wait(op["id"]))["status"] == "Cancelled"


async def test_control_close_kills(raw: Raw) -> None:
    op = await raw.exec_op(INSTANCE, ["sleep", "60"])
    ctl = await raw.connect(op, "control")
    socks = [await raw.connect(op, fd) for fd in ("0", "1", "2")]
    await ctl.close()
    assert (await raw.wait(op["id"], 20))["metadata"]["return"] == 137
    for ws in socks:
        await ws.close()
