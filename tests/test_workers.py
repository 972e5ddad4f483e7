"""A node's front end on two processes (``execbroker up --workers 2``): the agent and one worker accept on
the same unix socket, and every request works whichever process the kernel gave its connection to.

Each operation's id names the process that runs it (its last byte: 00 the agent, 01 the worker), so the
tests see that both processes served, and that requests crossing between them (a wait, a websocket, the
events stream, a file push, a list) reach the right one."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pylxd
import pytest
from websockets.asyncio.client import unix_connect

from tests.conftest import (
    Broker,
    assert_no_leftovers,
    private_base,
    processes_mentioning,
    start_broker,
    stop_broker,
    wait_for,
)
from tests.wsutil import Raw, read_stream, run

PROCESSES = ("00", "01")


@pytest.fixture(scope="module")
def node() -> Iterator[Broker]:
    base = private_base("ebw-")
    b = start_broker(base, EXECBROKER_WORKERS="2")
    try:
        wait_for(lambda: worker_pids(b), 30, "the worker process to start")
        yield b
    finally:
        stop_broker(b)
        assert_no_leftovers(base, 30)
        shutil.rmtree(base, ignore_errors=True)


def worker_pids(b: Broker) -> list[int]:
    return [pid for pid, cmd in processes_mentioning(str(b.data_dir)) if "node_agent.worker" in cmd]


def process_of(op_id: str) -> str:
    return op_id[-2:]


async def execs_until_both(raw: Raw, make: object, limit: int = 60) -> dict[str, list[object]]:
    """Run ``make()`` (a coroutine returning an operation id first) until both processes ran some."""
    seen: dict[str, list[object]] = {}
    for _ in range(limit):
        result = await make()  # type: ignore[operator]
        seen.setdefault(process_of(result[0]), []).append(result)
        if all(p in seen for p in PROCESSES) and sum(map(len, seen.values())) >= 8:
            return seen
    raise AssertionError(f"in {limit} execs only processes {sorted(seen)} served")


async def test_both_processes_run_execs_byte_exact(node: Broker) -> None:
    raw = Raw(node.socket)
    data = os.urandom(3 << 20)

    async def one() -> tuple[str, int, bytes, bytes]:
        code, out, err, final = await run(raw, "c1", ["sh", "-c", "cat; echo done >&2; exit 7"], stdin=data)
        return final["id"], code, out, err

    seen = await execs_until_both(raw, one)
    for results in seen.values():
        for _op, code, out, err in results:  # type: ignore[misc]
            assert (code, out == data, err) == (7, True, b"done\n")


async def test_lxc_exec_and_pylxd_on_either_process(node: Broker) -> None:
    """The real client opens the events stream, posts, dials four websockets and waits on events: on a
    two-process node these land on either process."""
    for i in range(12):
        r = node.lxc("exec", "c1", "--", "sh", "-c", f"head -c 5; echo :{i}; exit {i % 4}", input=b"hello")
        assert (r.returncode, r.stdout) == (i % 4, f"hello:{i}\n".encode()), r.stderr
    ops = [json.loads(line)["operation"] for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    assert {process_of(o) for o in ops[-12:]} == set(PROCESSES), ops[-12:]
    for i in range(4):  # a new client each time: its connections land anywhere
        result = await asyncio.to_thread(
            lambda: pylxd.Client(endpoint=str(node.socket)).instances.get("c1").execute(["echo", f"pylxd {i}"]))
        assert (result.exit_code, result.stdout) == (0, f"pylxd {i}\n")


def _venv_python() -> str:
    return str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")


async def _connection_on(raw: Raw, process: str) -> tuple[httpx.AsyncClient, str]:
    """A kept-alive connection that the kernel gave to ``process`` (a task exec on it tells)."""
    for _ in range(60):
        c = raw.client()
        r = await c.post("/1.0/instances/c1/exec", content=json.dumps(
            {"command": ["sleep", "30"], "wait-for-websocket": False}))
        op = r.json()["metadata"]["id"]
        if process_of(op) == process:
            return c, op
        await c.delete(f"/1.0/operations/{op}")
        await c.aclose()
    raise AssertionError(f"no connection reached process {process}")


async def test_requests_for_the_other_process_on_a_kept_alive_connection(node: Broker) -> None:
    """A connection stays with the process that accepted it: what it asks about the other process's
    operations goes across (get, wait, cancel, list; a websocket upgrade too)."""
    raw = Raw(node.socket)
    on_agent, agent_op = await _connection_on(raw, "00")
    on_worker, worker_op = await _connection_on(raw, "01")
    try:
        for conn, foreign in ((on_agent, worker_op), (on_worker, agent_op)):
            r = await conn.get(f"/1.0/operations/{foreign}")
            assert r.status_code == 200 and r.json()["metadata"]["status"] == "Running", r.text
            listed = {url for urls in (await conn.get("/1.0/operations")).json()["metadata"].values() for url in urls}
            assert {f"/1.0/operations/{agent_op}", f"/1.0/operations/{worker_op}"} <= listed
            r = await conn.delete(f"/1.0/operations/{foreign}")
            assert r.status_code == 200, r.text
            r = await conn.get(f"/1.0/operations/{foreign}/wait?timeout=10")
            assert r.json()["metadata"]["status"] == "Cancelled", r.text
            r = await conn.get("/1.0/operations/00000000-0000-4000-8000-000000000001")
            assert (r.status_code, r.json()["error"]) == (404, "Operation not found")
    finally:
        await on_agent.aclose()
        await on_worker.aclose()
    for process in PROCESSES:  # a websocket upgrade as the second request of a connection
        op = await _ws_op_on(raw, process)
        other = PROCESSES[1 - PROCESSES.index(process)]
        got = await _upgrade_after_request(node.socket, op, other)
        assert got == b"kept-alive\n"


async def _ws_op_on(raw: Raw, process: str) -> dict[str, object]:
    for _ in range(60):
        op = await raw.exec_op("c1", ["sh", "-c", "echo kept-alive"])
        if process_of(op["id"]) == process:  # type: ignore[arg-type]
            return op
        async with raw.client() as c:
            await c.delete(f"/1.0/operations/{op['id']}")
    raise AssertionError(f"no exec ran on process {process}")


async def _upgrade_after_request(path: Path, op: dict[str, object], process: str) -> bytes:
    """Socket 1 of ``op`` opened on a connection that ``process`` accepted and served a request on."""
    for _ in range(60):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        body = b'{"command": ["true"], "wait-for-websocket": false}'
        sock.sendall(b"POST /1.0/instances/c1/exec HTTP/1.1\r\nHost: eb\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        head = _read_response(sock)
        if process_of(json.loads(head.partition(b"\r\n\r\n")[2])["metadata"]["id"]) != process:
            sock.close()
            continue
        secrets = op["metadata"]["fds"]  # type: ignore[index]
        others = [await raw_connect(path, op, fd) for fd in ("0", "2", "control")]
        ws = await unix_connect(None, f"ws://eb/1.0/operations/{op['id']}/websocket?secret={secrets['1']}",
                                sock=sock, compression=None, ping_interval=None)
        try:
            return await read_stream(ws)
        finally:
            await ws.close()
            for o in others:
                await o.close()
    raise AssertionError(f"no connection reached process {process}")


async def raw_connect(path: Path, op: dict[str, object], fd: str):  # type: ignore[no-untyped-def]
    return await Raw(path).connect(op, fd)  # type: ignore[arg-type]


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


async def test_every_events_stream_sees_both_processes(node: Broker) -> None:
    raw = Raw(node.socket)
    streams = [await unix_connect(str(node.socket), "ws://eb/1.0/events?type=operation", compression=None)
               for _ in range(4)]
    try:
        ran = await execs_until_both(raw, lambda: _task(raw))
        wanted = {r[0] for results in ran.values() for r in results}  # type: ignore[index]
        for ws in streams:
            done: set[str] = set()
            while not wanted <= done:
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if event["metadata"]["status"] == "Success":
                    done.add(event["metadata"]["id"])
    finally:
        for ws in streams:
            await ws.close()


async def _task(raw: Raw) -> tuple[str]:
    r = await raw.post_exec("c1", {"command": ["true"], "wait-for-websocket": False})
    op = r.json()["metadata"]["id"]
    assert (await raw.wait(op))["status"] == "Success"
    return (op,)


async def test_proxied_requests_carry_the_callers_identity_only(node: Broker) -> None:
    """What the worker sends the agent names the caller it authenticated: a forged identity header is
    dropped (GET /1.0 is served by the agent, through the worker about half the time)."""
    forged = {"X-Execbroker-Identity": json.dumps({"username": "mallory", "protocol": "tls", "restricted": True,
                                                   "projects": []})}
    for _ in range(16):
        async with Raw(node.socket).client() as c:
            meta = (await c.get("/1.0", headers=forged)).json()["metadata"]
        assert (meta["auth_user_name"], meta["auth_user_method"]) == ("root", "unix")
    probe = subprocess.run(  # the agent's socket for its workers: our uid only
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", _venv_python(), "-c",
         "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
         f"try:\n s.connect({str(node.data_dir / 'workers.socket')!r})\nexcept PermissionError: sys.exit(13)"],
        capture_output=True, text=True, timeout=30)
    assert probe.returncode == 13, (probe.returncode, probe.stderr)


async def test_files_and_instances_through_the_worker(node: Broker) -> None:
    data = os.urandom(5 << 20) + b"end"
    src = node.base / "push.bin"
    src.write_bytes(data)
    for i in range(4):
        r = node.lxc("file", "push", str(src), f"c1/root/p{i}.bin")
        assert r.returncode == 0, r.stderr
        r = node.lxc("file", "pull", f"c1/root/p{i}.bin", str(node.base / "pulled.bin"))
        assert r.returncode == 0 and (node.base / "pulled.bin").read_bytes() == data, r.stderr
    r = node.lxc("list", "--format", "csv", "-c", "ns")
    assert r.stdout.decode().strip() == "c1,RUNNING", r.stderr


async def test_a_worker_that_dies_is_replaced(node: Broker) -> None:
    """Its running exec ends (the client's sockets close, the operation fails for every listener), a new
    worker takes its place, and execs run on it again."""
    raw = Raw(node.socket)
    events = await unix_connect(str(node.socket), "ws://eb/1.0/events?type=operation", compression=None)
    try:
        for _ in range(60):
            op = await raw.exec_op("c1", ["sleep", "60"])
            if process_of(op["id"]) == "01":
                break
            await raw.connect(op, "control")  # closed below with the rest: its command is killed
        else:
            raise AssertionError("no exec ran on the worker")
        sockets = [await raw.connect(op, fd) for fd in ("0", "1", "2", "control")]
        old = worker_pids(node)
        assert len(old) == 1
        os.kill(old[0], signal.SIGKILL)
        out = await asyncio.wait_for(read_stream(sockets[1]), 10)
        assert out == b""
        while True:
            event = json.loads(await asyncio.wait_for(events.recv(), 10))
            if event["metadata"]["id"] == op["id"] and event["metadata"]["status"] == "Failure":
                assert "worker process 1" in event["metadata"]["err"]
                break
        for ws in sockets:
            await ws.close()
    finally:
        await events.close()
    new = wait_for(lambda: [p for p in worker_pids(node) if p not in old], 30, "a new worker")
    assert new
    ran = await execs_until_both(raw, lambda: _task(raw))
    assert "01" in ran


async def test_metrics_count_every_process(node: Broker) -> None:
    """``/1.0/metrics`` (served by the agent) counts the execs of both processes."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    raw = Raw(node.socket)

    async def started() -> float:
        async with raw.client() as c:
            text = (await c.get("/1.0/metrics")).text
        return sum(s.value for f in text_string_to_metric_families(text) if f.name == "execbroker_execs_started"
                   for s in f.samples if s.labels.get("mode") == "task" and s.name.endswith("_total"))

    before = await started()
    ran = await execs_until_both(raw, lambda: _task(raw))
    assert await started() - before == sum(map(len, ran.values()))


@pytest.mark.parametrize(("flag", "env"), [("0", ""), ("65", ""), ("", "two"), ("", "65")])
def test_workers_out_of_bounds_is_refused_before_anything_starts(flag: str, env: str, tmp_path: Path) -> None:
    r = subprocess.run([_venv_python(), "-m", "client.cli", "up", *(["--workers", flag] if flag else []),
                        "--dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1], env={**os.environ, "EXECBROKER_WORKERS": env})
    assert (r.returncode, r.stderr.strip()) == (2, "execbroker: --workers must be 1..64"), r.stderr
    assert not list(tmp_path.glob("d/ray*"))
