"""The exec wire contract, driven with a raw websockets client against a real broker (spec §3-§7)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
import uuid
from datetime import datetime

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ADMIN_GID, Broker, processes_mentioning, wait_for
from tests.wsutil import Raw, read_stream, run

RETENTION = 5.0  # spec §2 step 5 (Incus keeps exactly 5 s): core/operations.py OperationRegistry(retention=5.0)
CONNECT_TIMEOUT = 10.0  # spec §5.2 [HEAD, LXD]: node_agent/session.py CONNECT_TIMEOUT

pytestmark = pytest.mark.broker


@pytest.fixture()
def raw(broker: Broker) -> Raw:
    return Raw(broker.socket)


@pytest.fixture()
def instance(broker: Broker):  # type: ignore[no-untyped-def]
    """A fresh instance (not started) that is removed after the test."""
    made: list[str] = []

    def make(name: str, start: bool = True) -> str:
        op = broker.api("POST", "/1.0/instances", {"name": name, "source": {"type": "image", "alias": "busybox"},
                                                   "start": start}, status=202)
        assert broker.wait_op(op["operation"])["status"] == "Success"
        made.append(name)
        return name

    yield make
    for name in made:
        broker.api("PUT", f"/1.0/instances/{name}/state", {"action": "unfreeze"})
        op = broker.api("PUT", f"/1.0/instances/{name}/state", {"action": "stop", "force": True})
        if op.get("operation"):
            broker.wait_op(op["operation"])
        op = broker.api("DELETE", f"/1.0/instances/{name}")
        if op.get("operation"):
            broker.wait_op(op["operation"])


async def test_echo_and_exit_codes(raw: Raw, c1: str) -> None:
    code, out, err, op = await run(raw, c1, ["sh", "-c", "echo hi; echo oops >&2; exit 7"])
    assert (code, out, err) == (7, b"hi\n", b"oops\n")
    assert op["status"] == "Success" and op["metadata"]["return"] == 7


@pytest.mark.parametrize("command, code, err", [
    (["nonexistent-command"], 127, "Command not found"),
    (["/root"], 126, "Command not executable"),
])
async def test_126_127_fail_the_operation(raw: Raw, c1: str, command: list[str], code: int, err: str) -> None:
    ret, _, _, op = await run(raw, c1, command)
    assert ret == code and op["status"] == "Failure" and op["err"] == err


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("KILL", 137), ("HUP", 129)])
async def test_killed_by_signal_inside(raw: Raw, c1: str, sig: str, code: int) -> None:
    ret, _, _, op = await run(raw, c1, ["sh", "-c", f"kill -{sig} $$; sleep 5"])
    assert ret == code and op["status"] == "Success"


async def test_stdin_binary_exact(raw: Raw, c1: str) -> None:
    data = os.urandom(3 << 20)
    _, out, _, _ = await run(raw, c1, ["md5sum"], stdin=data)
    assert out.split()[0].decode() == hashlib.md5(data).hexdigest()


async def test_large_write_then_exit_arrives_whole(raw: Raw, c1: str) -> None:
    code, out, _, _ = await run(raw, c1, ["sh", "-c", "head -c 12345678 /dev/zero | tr '\\0' x; exit 3"])
    assert code == 3 and len(out) == 12345678 and out == b"x" * 12345678


async def test_background_child_holding_output_does_not_hang(raw: Raw, c1: str) -> None:
    start = time.monotonic()
    code, out, _, _ = await run(raw, c1, ["sh", "-c", "sleep 30 & echo done"])
    assert (code, out) == (0, b"done\n")
    assert time.monotonic() - start < 20


async def test_environment_user_group_cwd(raw: Raw, c1: str) -> None:
    _, out, _, op = await run(raw, c1, ["sh", "-c", "id -u; id -g; pwd; echo $FOO $HOME $LANG"],
                              environment={"FOO": "bar"}, user=1000, group=1001, cwd="/tmp")
    assert out.decode().split("\n")[:4] == ["1000", "1001", "/tmp", "bar C.UTF-8"]
    _, out, _, op = await run(raw, c1, ["pwd"], user=None, group=None, cwd=None, environment=None)
    assert out == b"/root\n"
    assert op["metadata"]["environment"]["HOME"] == "/root"


async def test_interactive_size_and_resize(raw: Raw, c1: str) -> None:
    op = await raw.exec_op(c1, ["sh", "-c", "stty size; read x; stty size"], interactive=True,
                           width=80, height=24)
    assert set(op["metadata"]["fds"]) == {"0", "control"}
    ctl = await raw.connect(op, "control")
    s0 = await raw.connect(op, "0")
    buf = b""
    while b"24 80" not in buf:
        buf += await asyncio.wait_for(s0.recv(), 10)
    await ctl.send(json.dumps({"command": "window-resize", "args": {"width": "132", "height": "43"}}))
    await s0.send(b"\n")
    buf += await read_stream(s0)
    assert b"43 132" in buf
    final = await raw.wait(op["id"])
    assert final["metadata"]["return"] == 0
    await s0.close()
    await ctl.close()


async def test_signal_via_control(raw: Raw, c1: str) -> None:
    op = await raw.exec_op(c1, ["sh", "-c", "trap 'echo got; exit 42' USR1; echo ready; while :; do sleep 0.05; done"])
    ctl = await raw.connect(op, "control")
    s0, s1, s2 = [await raw.connect(op, fd) for fd in ("0", "1", "2")]
    assert await asyncio.wait_for(s1.recv(), 10) == b"ready\n"
    await ctl.send(json.dumps({"command": "signal", "signal": 10}))
    rest = await read_stream(s1)
    assert b"got" in rest
    assert (await raw.wait(op["id"]))["metadata"]["return"] == 42
    for ws in (s0, s1, s2, ctl):
        await ws.close()


async def test_control_close_kills_command(raw: Raw, c1: str) -> None:
    op = await raw.exec_op(c1, ["sleep", "60"])
    ctl = await raw.connect(op, "control")
    socks = [await raw.connect(op, fd) for fd in ("0", "1", "2")]
    await ctl.close()
    final = await raw.wait(op["id"], 20)
    assert final["metadata"]["return"] == 137
    for ws in socks:
        await ws.close()


async def test_stdout_disconnect_without_control_kills(raw: Raw, c1: str) -> None:
    op = await raw.exec_op(c1, ["sleep", "60"])
    socks = [await raw.connect(op, fd) for fd in ("0", "1", "2")]
    await socks[1].close()
    final = await raw.wait(op["id"], 20)
    assert final["metadata"].get("return") == 137, (final["status"], final["err"])


async def test_delete_operation_cancels(raw: Raw, c1: str) -> None:
    """DELETE of a running exec kills its command, the whole process group (a shell and its two
    background sleeps, found by a marker in their environment), and the operation ends Cancelled."""
    marker = f"EB_CANCEL_{uuid.uuid4().hex}"
    op = await raw.exec_op(c1, ["sh", "-c", "sleep 60 & sleep 60 & wait"], environment={"EB_MARK": marker})
    socks = [await raw.connect(op, fd) for fd in ("control", "0", "1", "2")]
    await asyncio.to_thread(wait_for, lambda: len(processes_mentioning(marker)) == 3, 20,
                            "the shell and its two sleeps running")
    async with raw.client() as c:
        r = await c.delete(f"/1.0/operations/{op['id']}")
        assert r.status_code == 200, r.text
    final = await raw.wait(op["id"])
    assert final["status"] == "Cancelled"
    await asyncio.to_thread(wait_for, lambda: not processes_mentioning(marker), 20,
                            "every process of the cancelled command gone")
    for ws in socks:
        await ws.close()


async def test_delete_of_a_task_before_its_command_started(raw: Raw, c1: str) -> None:
    """A task exec cancelled in the same breath as its POST (before pid1 answered the spawn) still ends
    Cancelled at once, its command killed as soon as it exists (it used to run on, the operation stuck in
    Cancelling until the command ended by itself)."""
    marker = f"EB_EARLY_{uuid.uuid4().hex}"
    async with raw.client() as c:
        r = await c.post(f"/1.0/instances/{c1}/exec", content=json.dumps(
            {"command": ["sleep", "600"], "wait-for-websocket": False, "environment": {"EB_MARK": marker}}))
        op = r.json()["metadata"]["id"]
        r = await c.delete(f"/1.0/operations/{op}")
        assert r.status_code == 200, r.text
    final = await raw.wait(op, 20)
    assert final["status"] == "Cancelled", final
    await asyncio.to_thread(wait_for, lambda: not processes_mentioning(marker), 20, "the command gone")


async def test_wrong_secret_and_duplicate(raw: Raw, c1: str) -> None:
    op = await raw.exec_op(c1, ["cat"])
    base = f"ws://eb/1.0/operations/{op['id']}/websocket?secret="
    status, body = await raw.handshake_status(base + "f" * 64)
    assert status == 403 and body["error"] == "Forbidden" and body["type"] == "error"
    s0 = await raw.connect(op, "0")
    status, body = await raw.handshake_status(base + op["metadata"]["fds"]["0"])
    assert status == 409 and "already connected" in body["error"]
    status, body = await raw.handshake_status(f"ws://eb/1.0/operations/{'0' * 8}-0000-0000-0000-000000000000/websocket?secret=x")
    assert status == 404
    s1, s2 = await raw.connect(op, "1"), await raw.connect(op, "2")
    await s0.send("")
    await read_stream(s1)
    assert (await raw.wait(op["id"]))["metadata"]["return"] == 0
    for ws in (s0, s1, s2):
        await ws.close()


async def test_other_identity_is_refused(raw: Raw, c1: str, broker: Broker) -> None:
    """Another admin (uid 65534 in the execbroker group) may not attach to root's exec."""
    op = await raw.exec_op(c1, ["cat"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.setegid(ADMIN_GID)
    os.seteuid(65534)  # SO_PEERCRED records the credentials at connect()
    try:
        sock.connect(str(broker.socket))
    finally:
        os.seteuid(0)
        os.setegid(0)
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as exc:
        await ws_connect(f"ws://eb/1.0/operations/{op['id']}/websocket?secret={op['metadata']['fds']['0']}",
                         sock=sock, compression=None)
    assert exc.value.response.status_code == 403
    assert json.loads(exc.value.response.body)["error"] == "Requestor mismatch"
    async with raw.client() as c:
        await c.delete(f"/1.0/operations/{op['id']}")


async def test_connect_timeout(raw: Raw, c1: str) -> None:
    """Spec §5.2: with socket 0 connected but not 1 and 2, the operation fails after 10 s (not sooner),
    the connected socket is closed, no return is set, and the command never started."""
    marker = f"/root/connect-timeout-{uuid.uuid4().hex}"
    posted = time.monotonic()  # the server's wait starts after this
    op = await raw.exec_op(c1, ["touch", marker])
    s0 = await raw.connect(op, "0")
    final = await raw.wait(op["id"], 30)
    waited = time.monotonic() - posted
    assert final["status"] == "Failure"
    assert final["err"] == "Timed out waiting for websockets to connect"
    assert "return" not in final["metadata"]
    assert waited >= CONNECT_TIMEOUT - 0.25, f"failed after {waited:.2f} s, before the 10 s connect window"
    with pytest.raises(ConnectionClosed):  # the server closes what was connected
        await asyncio.wait_for(s0.recv(), 10)
    code, out, err, _ = await run(raw, c1, ["sh", "-c", f"test -e {marker} && echo ran || echo never-ran"])
    assert (code, out) == (0, b"never-ran\n"), err


@pytest.mark.parametrize("body, text", [
    ({"command": ["true"], "record-output": True, "wait-for-websocket": True},
     'Cannot use "record-output" in combination with "wait-for-websocket"'),
    ({"command": ["true"], "record-output": True, "interactive": True},
     'Cannot use "interactive" in combination with "record-output"'),
])
async def test_exclusive_flags(raw: Raw, c1: str, body: dict[str, object], text: str) -> None:
    r = await raw.post_exec(c1, body)
    assert r.status_code == 400 and r.json()["error"] == text and r.json()["error_code"] == 400


async def test_request_errors(raw: Raw, c1: str, instance) -> None:  # type: ignore[no-untyped-def]
    async with raw.client() as c:
        r = await c.post("/1.0/instances/c1%2Fsnap0/exec", content=b'{"command":["true"]}')
        assert (r.status_code, r.json()["error"]) == (400, "Invalid instance name")
        r = await c.post("/1.0/instances/nope/exec", content=b'{"command":["true"]}')
        assert (r.status_code, r.json()["error"]) == (404, "Instance not found")
        r = await c.post("/1.0/instances/c1/exec", content=b'{"command": [')
        assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]
        r = await c.post("/1.0/instances/c1/exec?project=other", content=b'{"command":["true"]}')
        assert (r.status_code, r.json()["error"]) == (404, "Project not found")
        r = await c.get("/1.0/operations/x/wait?timeout=abc")  # Incus parses the timeout before the lookup
        assert (r.status_code, r.json()["error"]) == (500, 'strconv.Atoi: parsing "abc": invalid syntax')
    stopped = instance("stopped1", start=False)
    r = await raw.post_exec(stopped, {"command": ["true"]})
    assert (r.status_code, r.json()["error"]) == (400, "Instance is not running")
    frozen = instance("frozen1")
    async with raw.client() as c:
        r = await c.put(f"/1.0/instances/{frozen}/state", json={"action": "freeze"})
        assert (await raw.wait(r.json()["metadata"]["id"]))["status"] == "Success"
    r = await raw.post_exec(frozen, {"command": ["true"]})
    assert (r.status_code, r.json()["error"]) == (400, "Instance is frozen")


async def test_task_mode_record_output(raw: Raw, c1: str) -> None:
    r = await raw.post_exec(c1, {"command": ["sh", "-c", "printf hello; printf err >&2; exit 5"],
                                 "record-output": True})
    assert r.status_code == 202 and r.json()["metadata"]["class"] == "task"
    final = await raw.wait(r.json()["metadata"]["id"])
    assert final["metadata"]["return"] == 5
    out_url = final["metadata"]["output"]["1"]
    async with raw.client() as c:
        assert (await c.get(out_url)).content == b"hello"
        assert (await c.get(final["metadata"]["output"]["2"])).content == b"err"
        listing = (await c.get("/1.0/instances/c1/logs/exec-output")).json()["metadata"]
        assert out_url in listing
        assert (await c.delete(out_url)).status_code == 200
        assert (await c.get(out_url)).status_code == 404
        # LXD's validExecOutputFileName: a file name (no "/", "\\" or ".."), exec_*.stdout or .stderr
        for bad, name in (("..%2Fx", "../x"), ("exec_x.txt", "exec_x.txt"), ("foo", "foo"),
                          ("exec_..stdout", "exec_..stdout")):
            r = await c.get(f"/1.0/instances/c1/logs/exec-output/{bad}")
            assert (r.status_code, r.json()["error"]) == (400, f'Exec record-output file name "{name}" not valid')


async def test_exec_output_symlinked_dir_refused(raw: Raw, broker: Broker, instance) -> None:  # type: ignore[no-untyped-def]
    name = instance("linky")
    target = broker.base / "elsewhere"
    target.mkdir()
    (target / "exec_1.stdout").write_text("secret")
    out_dir = broker.data_dir / "instances" / name / "exec-output"
    out_dir.symlink_to(target)
    async with raw.client() as c:
        r = await c.get(f"/1.0/instances/{name}/logs/exec-output/exec_1.stdout")
        assert r.status_code == 400 and "secret" not in r.text
        r = await c.get(f"/1.0/instances/{name}/logs/exec-output")
        assert r.status_code == 400
    r = await raw.post_exec(name, {"command": ["echo", "x"], "record-output": True})
    final = await raw.wait(r.json()["metadata"]["id"])
    assert final["status"] == "Failure" and "directory" in final["err"]
    assert not any(p.name.startswith("exec_") and p.name != "exec_1.stdout" for p in target.iterdir())


async def test_task_mode_return_and_missing(raw: Raw, c1: str) -> None:
    r = await raw.post_exec(c1, {"command": ["touch", "/root/foo1"]})
    assert r.json()["metadata"]["metadata"] == {}
    assert (await raw.wait(r.json()["metadata"]["id"]))["metadata"]["return"] == 0
    r = await raw.post_exec(c1, {"command": ["missingcmd"]})
    final = await raw.wait(r.json()["metadata"]["id"])
    assert final["metadata"]["return"] == 127 and final["err"] == "Command not found"


async def test_operations_list_and_retention(raw: Raw, c1: str) -> None:
    """A finished operation is listed and GET-able for at least 5 s after it finished (spec §2 step 5,
    must-have 4), then gone: 404 `Operation not found`, within a few seconds more."""
    _, _, _, op = await run(raw, c1, ["true"])
    assert op["status"] == "Success"
    finished = datetime.fromisoformat(op["updated_at"]).timestamp()  # its final transition (same host clock)
    async with raw.client() as c:
        listing = (await c.get("/1.0/operations")).json()["metadata"]
        assert f"/1.0/operations/{op['id']}" in listing.get("success", [])
        full = (await c.get("/1.0/operations?recursion=1")).json()["metadata"]
        assert any(o["id"] == op["id"] and o["status_code"] == 200 for o in full["success"])
        # Poll until it is gone; the last 200's send time is a lower bound of how long it was kept.
        last_present = finished
        while True:
            sent = time.time()
            r = await c.get(f"/1.0/operations/{op['id']}")
            if r.status_code == 404:
                break
            assert r.status_code == 200 and r.json()["metadata"]["status"] == "Success", r.text
            last_present = sent
            assert sent < finished + RETENTION + 10, "operation still there 10 s after its retention"
            await asyncio.sleep(0.05)
    assert (r.json()["error_code"], r.json()["error"]) == (404, "Operation not found")
    kept = last_present - finished
    assert kept >= RETENTION - 0.5, f"gone {kept:.2f} s after it finished: retention must be >= 5 s"


async def test_events_in_order(raw: Raw, c1: str, broker: Broker) -> None:
    """Spec §2 and §7.1: an exec operation's events, every one and in order: created (Pending), started
    (Running), `return` set (still Running), final (Success, with `return`)."""
    events = await __import__("websockets").asyncio.client.unix_connect(
        str(broker.socket), "ws://eb/1.0/events?type=operation", compression=None)
    _, _, _, op = await run(raw, c1, ["true"])
    seen = []
    while not seen or seen[-1]["status_code"] < 200:
        ev = json.loads(await asyncio.wait_for(events.recv(), 10))
        if ev["metadata"]["id"] == op["id"]:
            assert ev["type"] == "operation"
            seen.append(ev["metadata"])
    await events.close()
    assert [(m["status"], m["status_code"], m["metadata"].get("return")) for m in seen] == [
        ("Pending", 105, None), ("Running", 103, None), ("Running", 103, 0), ("Success", 200, 0)]
    status, body = await raw.handshake_status("ws://eb/1.0/events?type=bogus")
    assert status == 400 and body["error"] == '"bogus" isn\'t a supported event type'


def test_server_info(broker: Broker) -> None:
    info = broker.api("GET", "/1.0", status=200)["metadata"]
    assert info["auth"] == "trusted" and "container_exec_recording" in info["api_extensions"]
    assert info["environment"]["server_clustered"] is False
    r = broker.api("GET", "/1.0/nonsense")
    assert r["error_code"] == 404



def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_slow_reader_pauses_the_command(raw: Raw, c1: str, broker: Broker) -> None:
    """Backpressure: a client that does not read stdout stops the command at a full pipe; the agent
    holds a bounded amount (no growth while the command is blocked), and everything flows once read."""
    agent = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    before = _rss_kib(agent)
    size = 256 << 20
    op = await raw.exec_op(c1, ["head", "-c", str(size), "/dev/zero"])
    socks = {fd: await raw.connect(op, fd) for fd in ("0", "1", "2")}

    def blocked_writer() -> bool:  # the command sleeps in pipe_write: nobody drains its stdout
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:2] != [b"head", b"-c"]:
                        continue
                with open(f"/proc/{pid}/wchan") as f:
                    return "pipe_write" in f.read()  # anon_pipe_write on newer kernels
            except OSError:
                continue
        return False

    from tests.conftest import wait_for
    # If the agent kept reading into memory, head would write its 256 MiB and exit instead of blocking.
    await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(blocked_writer, 30, "a blocked writer"))
    assert _rss_kib(agent) - before < 32 << 10  # KiB: in flight is a pipe and socket buffers, not the output
    got = len(await read_stream(socks["1"]))
    assert got == size
    assert (await raw.wait(op["id"]))["metadata"]["return"] == 0
    for ws in socks.values():
        await ws.close()
