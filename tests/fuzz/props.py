"""The properties every fuzz target checks against a live broker, and the runner shared by the short run
(tests/test_fuzz.py) and the long one (the bench's ``fuzz`` workload). Targets: tests/fuzz/targets.py.

- every answer is an Incus envelope (or a file's bytes): an error has ``error_code`` equal to the HTTP
  status and a message; a 500 only for the genuine internal conditions the contract names (``KNOWN_500``);
- nothing hangs: every request and every example has a deadline, and missing it fails the example;
- nothing leaks: after a target, the agent's fds, the agent's children, each instance's processes and its
  pid1's fds are back where they were (waited for with a deadline), and the agent logged no error meanwhile;
- the agent keeps serving: a normal exec works after every target.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from tests.wsutil import Raw, run

T = TypeVar("T")

REQUEST_TIMEOUT = 10.0  # seconds for any one request or handshake
WAIT_TIMEOUT = 15.0  # seconds for an operation to end (a websocket exec nobody connects to ends in 10)
EXAMPLE_TIMEOUT = 45.0  # seconds for a whole example
SETTLE_TIMEOUT = 20.0  # seconds for fds and processes to come back after a target
MAX_BODY_READ = 4 << 20  # a response body larger than this is a failure (nothing we ask for is that big)
ENVELOPE_KEYS = {"type", "status", "status_code", "operation", "error_code", "error", "metadata"}
# The 500s the contract has (spec §4.3, §4.4) or that are genuine internal conditions (files: the disk).
KNOWN_500 = re.compile(
    r'strconv\.Atoi: parsing ".*": (invalid syntax|value out of range)'
    r"|Only websocket operations can be connected|Only running operations can be connected|missing secret"
    r"|The file was closed|The file shrank while it was read|Failed to write .*: (No space left on device|"
    r"Input/output error|Disk quota exceeded)", re.DOTALL)


ERROR_LINE = re.compile(r"^ERROR:| ERROR ")  # uvicorn's, and the agent's (asctime name levelname message)


class Hang(AssertionError):
    """A request or an example that missed its deadline."""


async def within(aw: Awaitable[T], seconds: float, what: str) -> T:
    try:
        return await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        raise Hang(f"hang: {what} (no answer in {seconds:g} s)") from None


@dataclass
class Reply:
    """An HTTP answer, its body read (at most MAX_BODY_READ bytes)."""

    status: int
    headers: httpx.Headers
    body: bytes
    method: str
    what: str
    path: str = ""  # as sent (percent-encoded, without the query)

    def json(self) -> Any:
        return json.loads(self.body)


def check_reply(r: Reply) -> dict[str, Any] | None:
    """The wire properties of any answer; its envelope (None for a file's bytes or a HEAD)."""
    where = f"{r.what} -> {r.status}"
    if r.method == "HEAD":
        assert not r.body, f"{where}: a HEAD answered with a body"
        assert r.status < 500 or r.status in (501, 503), f"{where}: HEAD failed with a server error"
        return None
    ctype = r.headers.get("content-type", "")
    path = unquote(r.path)
    if r.status == 307 and path.endswith("/") and unquote(urlsplit(r.headers.get("location", "")).path) == path.rstrip("/"):
        return None  # Starlette's redirect of a trailing slash (Incus would 404)
    if r.status == 200 and ctype.startswith("application/octet-stream"):
        return None  # a file's content, or a record-output file
    assert ctype.startswith("application/json"), f"{where}: not JSON ({ctype!r}): {r.body[:300]!r}"
    try:
        doc = r.json()
    except ValueError:
        raise AssertionError(f"{where}: body is not JSON: {r.body[:300]!r}") from None
    assert isinstance(doc, dict) and set(doc) == ENVELOPE_KEYS, f"{where}: not an Incus envelope: {doc!r:.300}"
    kind = doc["type"]
    if kind == "error":
        assert 400 <= r.status < 600 and doc["error_code"] == r.status, f"{where}: error envelope {doc}"
        assert isinstance(doc["error"], str) and doc["error"], f"{where}: error without a message"
        assert "Traceback" not in doc["error"], f"{where}: traceback in the error: {doc['error'][:300]}"
        assert r.headers.get("x-content-type-options") == "nosniff", f"{where}: error without nosniff"
        if r.status >= 500 and r.status not in (501, 503):  # 501: an unknown method on a known path
            assert r.status == 500 and KNOWN_500.fullmatch(doc["error"]), \
                f"{where}: unexpected server error: {doc['error'][:300]!r}"
    elif kind == "sync":
        assert r.status in (200, 201) and doc["status_code"] == 200, f"{where}: sync envelope {doc!r:.300}"
    elif kind == "async":
        assert r.status == 202 and doc["status_code"] == 100 and isinstance(doc["metadata"], dict) \
            and doc["operation"] == f"/1.0/operations/{doc['metadata'].get('id')}", f"{where}: async {doc!r:.300}"
    else:
        raise AssertionError(f"{where}: unknown envelope type {kind!r}")
    return doc


# ---- the broker under fuzz ----------------------------------------------------------------------------------

@dataclass
class Fuzz:
    """One broker under fuzz: its socket, where Ray keeps the agent's log, the instances used, and the
    event loop every example runs in (one per run: the HTTP client's connections stay open across examples)."""

    socket: Path
    ray_dir: Path | None = None  # the broker's RAY_TMPDIR (the agent's stderr is a worker log there)
    instance: str = "c1"  # running; exec targets use it
    running: str = "fz-run"  # scratch instances for the file routes: anything may happen to their files
    stopped: str = "fz-stop"
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _http: httpx.AsyncClient | None = None

    @property
    def raw(self) -> Raw:
        return Raw(self.socket)

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                           base_url="http://eb", timeout=REQUEST_TIMEOUT)
        return self._http

    def run(self, coro: Coroutine[Any, Any, T], seconds: float = EXAMPLE_TIMEOUT, what: str = "example") -> T:
        return self.loop.run_until_complete(within(coro, seconds, what))

    def close(self) -> None:
        if self._http is not None:
            self.loop.run_until_complete(self._http.aclose())
        self.loop.close()

    async def request(self, method: str, path: str, content: bytes | None = None,
                      headers: dict[str, str] | None = None, params: Any = None,
                      timeout: float = REQUEST_TIMEOUT) -> Reply:
        """One request with a deadline; its answer, the body read up to MAX_BODY_READ bytes."""
        what = f"{method} {path[:200]}" + (f" {params!r:.200}" if params else "")

        async def go() -> Reply:
            req = self.http.build_request(method, path, content=content, headers=headers, params=params,
                                          timeout=timeout)
            resp = await self.http.send(req, stream=True)
            try:
                body = bytearray()
                async for chunk in resp.aiter_raw():
                    body += chunk
                    assert len(body) <= MAX_BODY_READ, f"{what}: answer over {MAX_BODY_READ} bytes"
            finally:
                await resp.aclose()
            return Reply(resp.status_code, resp.headers, bytes(body), method, what, req.url.raw_path.split(b"?")[0].decode())

        return await within(go(), timeout + 2, what)

    async def call(self, method: str, path: str, body: bytes | None = None, params: Any = None,
                   headers: dict[str, str] | None = None,
                   timeout: float = REQUEST_TIMEOUT) -> tuple[Reply, dict[str, Any] | None]:
        """A request whose answer must pass ``check_reply``."""
        r = await self.request(method, path, body, headers, params, timeout)
        return r, check_reply(r)

    async def finish(self, op: dict[str, Any], cancel: bool = False) -> dict[str, Any]:
        """Wait for an operation to end (cancelling it first if asked): its final form. Missing the
        deadline is a hang; an operation that cannot be cancelled is just waited for."""
        url = f"/1.0/operations/{op['id']}"
        if cancel:
            r, doc = await self.call("DELETE", url)
            assert r.status in (200, 400, 404), f"cancel {url}: {r.status} {doc}"
        r, doc = await self.call("GET", f"{url}/wait", params={"timeout": str(int(WAIT_TIMEOUT))},
                                 timeout=WAIT_TIMEOUT + 5)
        assert r.status == 200 and doc is not None, f"wait {url}: {r.status} {doc}"
        final = doc["metadata"]
        if final["status_code"] < 200:
            raise Hang(f"hang: operation {op['id']} still {final['status']} {WAIT_TIMEOUT:g} s after {'cancel' if cancel else 'start'}"
                       f" ({final['description']}, {final['metadata']!r:.200})")
        return final

    async def exec_op(self, command: list[str], **body: Any) -> dict[str, Any]:
        """A websocket exec on the fuzz instance: its operation (202 asserted)."""
        r, doc = await self.call("POST", f"/1.0/instances/{self.instance}/exec",
                                 json.dumps({"command": command, "wait-for-websocket": True, **body}).encode())
        assert r.status == 202 and doc is not None, f"exec {command}: {r.status} {r.body[:300]!r}"
        op: dict[str, Any] = doc["metadata"]
        return op

    async def connect(self, op: dict[str, Any], fd: str) -> ClientConnection:
        return await within(self.raw.connect(op, fd), REQUEST_TIMEOUT, f"connect socket {fd}")

    # -- what the leak checks read --------------------------------------------------------------------
    async def agent_pid(self) -> int:
        _, doc = await self.call("GET", "/1.0")
        assert doc is not None
        return int(doc["metadata"]["environment"]["server_pid"])

    async def processes(self, name: str) -> tuple[int, int]:
        """An instance's process count and its pid1's open fds (0, 0 when it is not running)."""
        r, doc = await self.call("GET", f"/1.0/instances/{name}/state")
        if r.status == 404 or doc is None or not doc["metadata"].get("pid"):
            return 0, 0
        state = doc["metadata"]
        try:
            pid1_fds = _fds(int(state["pid"]))
        except OSError:
            pid1_fds = 0
        return int(state.get("processes") or 0), pid1_fds

    def agent_log(self, pid: int) -> Path | None:
        if self.ray_dir is None:
            return None
        found = glob.glob(str(self.ray_dir / "ray" / "session_latest" / "logs" / f"worker-*-{pid}.err"))
        return Path(found[0]) if found else None


# ---- leaks --------------------------------------------------------------------------------------------------

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> frozenset[int]:
    kids: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            kids.update(int(k) for k in f.read().split())
    return frozenset(kids)


@dataclass(frozen=True)
class Snapshot:
    agent: int
    fds: int
    children: frozenset[int]
    processes: dict[str, tuple[int, int]]  # instance -> (processes, its pid1's fds)
    log: Path | None
    log_size: int


async def snapshot(fz: Fuzz) -> Snapshot:
    pid = await fz.agent_pid()
    procs = {name: await fz.processes(name) for name in (fz.instance, fz.running, fz.stopped)}
    log = fz.agent_log(pid)
    return Snapshot(pid, _fds(pid), _children(pid), procs, log, log.stat().st_size if log else 0)


async def settle(fz: Fuzz, before: Snapshot, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until what ``before`` counted is back (no more fds, no new children, no more processes in any
    instance); fail at the deadline saying what is left. Then: no traceback in the agent's log."""
    assert await fz.agent_pid() == before.agent, "the agent was restarted"
    deadline = time.monotonic() + timeout
    while True:
        fds, kids = _fds(before.agent), _children(before.agent)
        procs = {name: await fz.processes(name) for name in before.processes}
        left = []
        if fds > before.fds:
            left.append(f"agent fds {before.fds} -> {fds}")
        if kids - before.children:
            left.append(f"new agent children {sorted(kids - before.children)}")
        for name, (count, pid1_fds) in procs.items():
            was_count, was_fds = before.processes[name]
            if count > was_count:
                left.append(f"{name}: processes {was_count} -> {count}")
            if pid1_fds > was_fds:
                left.append(f"{name}: pid1 fds {was_fds} -> {pid1_fds}")
        if not left:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked after {timeout:g} s: {'; '.join(left)}")
        await asyncio.sleep(0.05)
    if before.log is not None:
        logged = _tail(before.log, before.log_size)
        errors = [line for line in logged.splitlines() if ERROR_LINE.search(line)]
        assert "Traceback" not in logged and not errors, f"the agent logged errors:\n{logged[-4000:]}"


def _tail(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def still_serving(fz: Fuzz) -> None:
    """A normal exec works, byte for byte."""
    code, out, err, _ = await within(run(fz.raw, fz.instance, ["echo", "still serving"]), 30, "a normal exec")
    assert (code, out, err) == (0, b"still serving\n", b""), (code, out, err)


# ---- the runner ---------------------------------------------------------------------------------------------

Example = Callable[["Fuzz", Any], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Target:
    name: str
    cases: st.SearchStrategy[Any]
    example: Example
    short: int  # examples in the normal suite (the long run takes EXECBROKER_FUZZ_EXAMPLES or its own)


@dataclass
class Outcome:
    target: str
    examples: int
    seconds: float
    failure: str = ""


def run_target(fz: Fuzz, target: Target, examples: int, seed_value: int | None = None,
               shrink: bool = False) -> Outcome:
    """``examples`` examples of ``target`` (derandomized unless a seed is given), then the leak and
    liveness checks. Raises on the first violated property (hypothesis' falsifying example)."""
    count = 0
    started = time.monotonic()
    before = fz.run(snapshot(fz), 30, "snapshot")

    @settings(max_examples=examples, deadline=None, derandomize=seed_value is None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False,
              phases=(Phase.explicit, Phase.generate, *((Phase.shrink,) if shrink else ())))
    @given(case=target.cases)
    def prop(case: Any) -> None:
        nonlocal count
        count += 1
        fz.run(target.example(fz, case), EXAMPLE_TIMEOUT, f"{target.name} example")

    if seed_value is not None:
        prop = seed(seed_value)(prop)
    prop()
    fz.run(settle(fz, before), SETTLE_TIMEOUT + 15, "settle")
    fz.run(still_serving(fz), 40, "a normal exec")
    return Outcome(target.name, count, time.monotonic() - started)
