"""Exec targets: ``POST /1.0/instances/{name}/exec`` bodies, and control-socket messages during a
running command; and the client side of an exec that both (and tests/fuzz/frames.py) use."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fuzz.props import REQUEST_TIMEOUT, Fuzz, within
from tests.fuzz.values import FLOATS, INTS, JSON, PLAIN, TEXT, dumps, either, nested, weighted
from tests.wsutil import read_stream

KILL = json.dumps({"command": "signal", "signal": 9})

# ---- the client side of an exec -----------------------------------------------------------------------------


@dataclass
class Session:
    """An exec's websockets, connected, with a reader on each output stream."""

    op: dict[str, Any]
    socks: dict[str, ClientConnection]
    outputs: dict[str, asyncio.Task[bytes]] = field(default_factory=dict)

    async def send(self, fd: str, message: str | bytes) -> bool:
        """False when that socket is gone (or was never there)."""
        ws = self.socks.get(fd)
        if ws is None:
            return False
        try:
            await within(ws.send(message), REQUEST_TIMEOUT, f"a send on socket {fd}")
        except ConnectionClosed:
            return False
        return True

    async def ended(self, fz: Fuzz) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The operation's end (no cancel: what the client did must end it), every output stream to its
        barrier, and every socket closed by the server."""
        final = await fz.finish(self.op)
        got = {fd: await within(task, REQUEST_TIMEOUT, f"socket {fd} to end") for fd, task in self.outputs.items()}
        for fd, ws in self.socks.items():
            await within(ws.wait_closed(), REQUEST_TIMEOUT, f"the server to close socket {fd} after the end")
        return final, got


async def _output(ws: ClientConnection, interactive: bool) -> bytes:
    """An output stream to its barrier; an interactive socket 0 is then closed, as the Go client does
    (the server waits 2 s for that)."""
    out = await read_stream(ws)
    if interactive:
        await ws.close()
    return out


@contextlib.asynccontextmanager
async def attached(fz: Fuzz, op: dict[str, Any], skip: str = "") -> AsyncIterator[Session]:
    """Every socket of an exec but ``skip``, control first (the command starts once 0, 1 and 2 are
    there, and may end before a later control could connect). A detachable exec whose command has
    already ended takes only its output sockets (400 for the others)."""
    session = Session(op, {})
    interactive = bool(op["metadata"].get("interactive"))
    try:
        for fd in sorted(op["metadata"]["fds"], key=lambda fd: fd != "control"):
            if fd == skip:
                continue
            try:
                session.socks[fd] = await fz.connect(op, fd)
            except InvalidStatus as exc:
                if not (op["metadata"].get("detachable") and exc.response.status_code == 400
                        and b"The command has ended" in (exc.response.body or b"")):
                    raise
        session.outputs = {fd: asyncio.ensure_future(_output(session.socks[fd], interactive))
                           for fd in (("0",) if interactive else ("1", "2")) if fd in session.socks}
        yield session
    finally:
        for task in session.outputs.values():
            task.cancel()
        for ws in session.socks.values():
            await ws.close()


# ---- exec bodies --------------------------------------------------------------------------------------------

# argv[0] from commands that end by themselves, whatever their arguments, once their stdin ends (it is
# /dev/null in task mode): nothing fuzzed is ever run by a shell or as a program name, except names that
# do not exist.
COMMANDS = st.one_of(
    st.lists(PLAIN, max_size=4).map(lambda args: ["echo", *args]),
    st.lists(TEXT, max_size=4).map(lambda args: ["echo", *args]),
    st.sampled_from([["true"], ["false"], ["pwd"], ["id"], ["cat"], ["sh", "-c", "exit 3"], [], [""], ["/"],
                     ["/etc/passwd"], ["./x"], ["true", "\ud800"]]),
    TEXT.map(lambda s: ["/nonexistent/" + s]),
)
GOOD_FIELDS: dict[str, st.SearchStrategy[Any]] = {  # values of their kind, mostly within their bounds
    "environment": st.dictionaries(PLAIN, PLAIN, max_size=3),
    "wait-for-websocket": st.booleans(), "interactive": st.booleans(), "record-output": st.booleans(),
    "width": st.integers(0, 500), "height": st.integers(0, 500),
    "user": st.integers(0, 70000), "group": st.integers(0, 70000),
    "cwd": st.sampled_from(["/", "/tmp", "", "/nonexistent", "relative", "/etc/passwd", "/root"]),
    "timeout": st.floats(0.001, 5),
    "record-session": st.booleans(), "record-stdin": st.booleans(), "detachable": st.booleans(),
    "buffer-size": st.sampled_from([65535, 65536, 1 << 20, 256 << 20, (256 << 20) + 1]),
}
NUMBERS = ("width", "height", "user", "group", "buffer-size")
ANY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **{key: either(st.one_of(good, INTS) if key in NUMBERS else good) for key, good in GOOD_FIELDS.items()},
    "environment": either(st.dictionaries(TEXT, TEXT, max_size=3)),
    "cwd": either(st.one_of(GOOD_FIELDS["cwd"], TEXT)),
    "timeout": either(st.one_of(st.floats(0.001, 5), FLOATS, INTS)),
}
EXEC_DICTS = weighted(
    (2, st.fixed_dictionaries({"command": COMMANDS}, optional=GOOD_FIELDS)),
    (1, st.fixed_dictionaries({"command": either(COMMANDS)}, optional=ANY_FIELDS)),
    (1, st.fixed_dictionaries({}, optional={"command": JSON, **ANY_FIELDS, "extra": JSON})),
)
MODES: dict[str, dict[str, Any]] = {  # the mode fields in sets that are accepted
    "task": {}, "task-record": {"record-output": True},
    "websocket": {"wait-for-websocket": True}, "interactive": {"wait-for-websocket": True, "interactive": True},
    "detachable": {"wait-for-websocket": True, "detachable": True, "buffer-size": 65536},
    "detachable-interactive": {"wait-for-websocket": True, "detachable": True, "interactive": True},
    "detachable-record": {"wait-for-websocket": True, "detachable": True, "record-output": True},
    "recorded": {"wait-for-websocket": True, "record-session": True, "record-stdin": True},
    "recorded-interactive": {"wait-for-websocket": True, "interactive": True, "record-session": True},
}
ACCEPTED = st.builds(
    lambda command, mode, rest: {"command": command, **rest, **MODES[mode]},
    COMMANDS, st.sampled_from(sorted(MODES)),
    st.fixed_dictionaries({}, optional={k: GOOD_FIELDS[k] for k in
                                        ("environment", "width", "height", "user", "group", "cwd", "timeout")}))
ASCII = st.sampled_from([True, True, True, False])  # JSON with \u escapes, or UTF-8 (a surrogate: invalid)
EXEC_BODIES = weighted(
    (3, st.builds(dumps, ACCEPTED, ASCII)),
    (5, st.builds(dumps, EXEC_DICTS, ASCII)),
    (1, st.builds(dumps, JSON, ASCII)),
    (1, st.binary(min_size=1, max_size=64)),
    (1, st.tuples(st.builds(dumps, EXEC_DICTS), st.floats(0.05, 1)).map(lambda t: t[0][:int(len(t[0]) * t[1])])),
    (1, st.one_of(st.integers(1, 5000).map(lambda n: nested(n).encode()),
                  st.integers(1, 5000).map(lambda n: ('{"command": ' + nested(n, '"x"') + "}").encode()))),
)


@dataclass(frozen=True)
class ExecCase:
    body: bytes
    attach: bool  # a websocket exec: connect its sockets and let it run (else: cancel it unconnected)


EXEC_CASES = st.builds(ExecCase, EXEC_BODIES, st.booleans())


async def exec_body(fz: Fuzz, case: ExecCase) -> None:
    """Any body: a 4xx, or an operation that ends (run to its end when attached, else cancelled)."""
    r, doc = await fz.call("POST", f"/1.0/instances/{fz.instance}/exec", case.body)
    if r.status != 202:
        assert 400 <= r.status < 500, f"exec refused with {r.status}: {r.body[:300]!r}"
        return
    assert doc is not None
    op = doc["metadata"]
    if op["class"] != "websocket" or not case.attach:
        # a websocket exec nobody connects to would wait 10 s (a detachable one runs cat on): cancel it
        await fz.finish(op, cancel=op["class"] == "websocket")
        return
    interactive = op["metadata"].get("interactive")
    async with attached(fz, op) as session:  # every command above ends when its stdin does (a terminal's: ^D)
        if await session.send("0", b"x\n\x04" if interactive else b"x\n") and not interactive:
            await session.send("0", "")
        final, _ = await session.ended(fz)
        assert isinstance(final["metadata"].get("return", -1), int), final


# ---- control messages ---------------------------------------------------------------------------------------

ARGS = st.one_of(INTS, st.integers(-5, 70000).map(str), FLOATS, TEXT, st.none(), st.lists(st.integers(), max_size=2),
                 st.sampled_from(["80", " 80", "80\n", "+80", "0x50", "1e3", "\u0668\u0660", "8_0", "9" * 5000,
                                  "-1", "0", "65535", "65536"]))
CONTROL_DICTS = st.fixed_dictionaries({}, optional={
    "command": weighted((2, st.sampled_from(["window-resize", "signal"])), (1, TEXT), (1, JSON)),
    "args": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"width": ARGS, "height": ARGS}), JSON),
    "signal": st.one_of(st.integers(-3, 70), INTS, FLOATS, st.booleans(), TEXT, st.none()),
})
CONTROL_MESSAGES: st.SearchStrategy[str | bytes] = weighted(
    (2, CONTROL_DICTS.map(json.dumps)),  # text frames
    (1, JSON.map(json.dumps)),
    (1, st.text(max_size=40)),
    (1, st.integers(1, 5000).map(nested)),
    (1, st.integers(1, 5000).map(lambda n: '{"command": "window-resize", "args": ' + nested(n) + "}")),
    (1, st.binary(max_size=40)),  # binary frames
    (1, CONTROL_DICTS.map(lambda d: json.dumps(d).encode())),
)


def may_signal(message: str | bytes) -> bool:
    """Whether a control message could be a signal request (then the command may end before our SIGKILL)."""
    try:
        decoded = json.loads(message)
    except (ValueError, RecursionError):
        return False
    return isinstance(decoded, dict) and decoded.get("command") == "signal"


@dataclass(frozen=True)
class ControlCase:
    interactive: bool
    messages: tuple[str | bytes, ...]


CONTROL_CASES = st.builds(ControlCase, st.booleans(), st.lists(CONTROL_MESSAGES, max_size=8).map(tuple))


async def control(fz: Fuzz, case: ControlCase) -> None:
    """Whatever came before on the control socket, a SIGKILL request still ends the command."""
    op = await fz.exec_op(["cat"], interactive=case.interactive)
    async with attached(fz, op) as session:
        for message in case.messages:
            if not await session.send("control", message):
                break
        await session.send("control", KILL)
        final, _ = await session.ended(fz)
        code = final["metadata"].get("return")
        if not any(may_signal(m) for m in case.messages):
            assert code == 137, f"SIGKILL by the control socket: return {code}, {final['err']!r}"
