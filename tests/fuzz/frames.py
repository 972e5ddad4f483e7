"""The websocket-frames target: raw frames on one socket of a running ``cat`` (tests/fuzz/wire.py writes
them): data messages (fragmented, large, at and past the 16 MiB bound), text that is not UTF-8, pings
(floods), pongs, closes, protocol errors, unfinished frames, dropped connections. What the server must
make of each sequence is its ``Plan``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.fuzz import wire as fw
from tests.fuzz.execs import KILL, Session, attached, may_signal
from tests.fuzz.props import REQUEST_TIMEOUT, Fuzz, within
from tests.fuzz.values import pattern, weighted

WS_MAX = 16 << 20  # the broker's websocket message bound (api/server.py): past it, 1009


@dataclass(frozen=True)
class Data:
    """A data message, fragmented at ``cuts``, with a ping between fragments when ``pings``."""

    text: bool
    size: int = 0  # binary: this many pattern bytes
    raw: bytes = b""  # text: the payload (valid UTF-8 or not)
    cuts: tuple[int, ...] = ()
    pings: bool = False

    @property
    def payload(self) -> bytes:
        return self.raw if self.text else pattern(self.size)

    def frames(self) -> list[fw.Frame]:
        data = self.payload
        bounds = [0, *sorted(c for c in self.cuts if 0 < c < len(data)), len(data)]
        parts = [data[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
        out = []
        for i, part in enumerate(parts):
            out.append(fw.Frame(fw.CONT if i else (fw.TEXT if self.text else fw.BINARY), part, fin=i == len(parts) - 1))
            if self.pings and i < len(parts) - 1:
                out.append(fw.Frame(fw.PING, b"between"))  # control frames may come between fragments
        return out

    def error(self) -> int | None:
        if len(self.payload) > WS_MAX:
            return 1009
        if self.text:
            try:
                self.raw.decode()
            except UnicodeDecodeError:
                return 1007
        return None


@dataclass(frozen=True)
class Ping:
    size: int  # payload bytes (at most 125: a control frame's limit)
    count: int = 1  # > 1: a flood, in one write

    def frames(self) -> list[fw.Frame]:
        return [fw.Frame(fw.PING, pattern(self.size))] * self.count


@dataclass(frozen=True)
class Pong:
    size: int

    def frames(self) -> list[fw.Frame]:
        return [fw.Frame(fw.PONG, pattern(self.size))]


VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, *range(3000, 5000)}


@dataclass(frozen=True)
class Close:
    code: int | None
    reason: bytes = b""

    def frames(self) -> list[fw.Frame]:
        return [fw.Frame(fw.CLOSE, fw.close_payload(self.code, self.reason))]

    def error(self) -> int | None:
        if self.code is None:  # an empty close frame (no room for a reason)
            return None
        try:  # the reason is decoded before the code is checked
            self.reason.decode()
        except UnicodeDecodeError:
            return 1007
        return None if self.code in VALID_CLOSE else 1002


# Protocol errors, each with the close code RFC 6455 (and websockets) gives it.
BAD = {
    "rsv": ([fw.Frame(fw.BINARY, b"x", rsv=4)], 1002),
    "opcode": ([fw.Frame(0x3, b"x")], 1002),
    "control-opcode": ([fw.Frame(0xB, b"")], 1002),
    "unmasked": ([fw.Frame(fw.BINARY, b"x", masked=False)], 1002),
    "long-control": ([fw.Frame(fw.PING, pattern(126))], 1002),
    "fragmented-control": ([fw.Frame(fw.PING, b"p", fin=False)], 1002),
    "orphan-continuation": ([fw.Frame(fw.CONT, b"x")], 1002),
    "interleaved": ([fw.Frame(fw.BINARY, b"a", fin=False), fw.Frame(fw.BINARY, b"b")], 1002),
    "close-1-byte": ([fw.Frame(fw.CLOSE, b"\x03")], 1002),
    "oversize-claim": ([fw.Frame(fw.BINARY, b"", length=WS_MAX + 1)], 1009),
    "huge-claim": ([fw.Frame(fw.BINARY, b"", length=(1 << 63) - 1)], 1009),
    "oversize-fragments": ([fw.Frame(fw.BINARY, pattern(1000), fin=False),
                            fw.Frame(fw.CONT, b"", length=WS_MAX - 500)], 1009),
}


@dataclass(frozen=True)
class Bad:
    kind: str

    def frames(self) -> list[fw.Frame]:
        return BAD[self.kind][0]

    def error(self) -> int:
        return BAD[self.kind][1]


@dataclass(frozen=True)
class Unfinished:
    """A frame whose header claims more payload than is ever sent (the server waits for the rest)."""

    claimed: int
    sent: int

    def frames(self) -> list[fw.Frame]:
        return [fw.Frame(fw.BINARY, pattern(self.sent), length=self.claimed)]


@dataclass(frozen=True)
class Drop:
    """The connection dropped, without a close frame."""

    def frames(self) -> list[fw.Frame]:
        return []


Item = Data | Ping | Pong | Close | Bad | Unfinished | Drop

SIZES = st.one_of(st.integers(0, 300), st.integers(0, 70000), st.sampled_from([125, 126, 65535, 65536, 1 << 20]))
CUTS = st.lists(st.integers(0, 70000), max_size=3).map(tuple)
TEXTS = st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=30),
                  st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\xc3\xa9"]))
ITEMS: st.SearchStrategy[Item] = weighted(
    (2, st.builds(Data, st.just(False), SIZES, st.just(b""), CUTS, st.booleans())),
    (1, st.builds(Data, st.just(True), st.just(0), TEXTS, st.lists(st.integers(0, 30), max_size=3).map(tuple),
                  st.booleans())),
    (1, st.builds(Ping, st.integers(0, 125), st.one_of(st.just(1), st.integers(10, 3000)))),
    (1, st.builds(Pong, st.integers(0, 125))),
    (1, st.builds(Close, st.one_of(st.none(), st.sampled_from(sorted(VALID_CLOSE)[:12]), st.integers(0, 65535)),
                  st.one_of(st.just(b""), st.text(max_size=20).map(str.encode), st.just(b"\xff\xfe")))),
    (1, st.builds(Bad, st.sampled_from(sorted(BAD)))),
    (1, st.builds(Unfinished, st.integers(10, 70000), st.integers(0, 9))),
    (1, st.just(Drop())),
)
BIG = st.sampled_from([Data(False, WS_MAX), Data(False, WS_MAX + 1)])  # the bound itself, and one past it


@dataclass(frozen=True)
class Plan:
    """What the server must make of a sequence of items on one socket (RFC 6455 and spec §5.3): every
    complete binary message up to the first text message is data (socket 0: stdin); the first close,
    drop, unfinished frame or protocol error ends the connection (nothing after it is sent)."""

    items: tuple[Item, ...]  # what is sent
    delivered: bytes  # the binary data before the first text message or the end
    text_seen: bool  # a text message (on socket 0: the EOF barrier) came before the end
    end: str  # "open", "close", "error", "unfinished", "drop"
    code: int | None  # the close code of an error

    @property
    def exact(self) -> bool:
        """Whether all of ``delivered`` arrives: after a protocol error or a dropped connection, uvicorn
        may lose what came in the same read as the end (then only a prefix of it arrives)."""
        return self.end in ("open", "close")

    @property
    def close_seen(self) -> bool:
        """Whether the client must get the server's close frame: not when the server closes while the
        client still writes a message past the bound (a failed write makes asyncio drop what it received)."""
        last = self.items[-1] if self.items else None
        return not (isinstance(last, Data) and len(last.payload) > WS_MAX)

    @property
    def lost(self) -> bool:
        """The socket is gone for the server (or will be)."""
        return self.end != "open"

    @classmethod
    def of(cls, items: tuple[Item, ...]) -> Plan:
        delivered, text_seen = b"", False
        for i, item in enumerate(items):
            sent = items[:i + 1]
            if isinstance(item, (Data, Close, Bad)) and item.error() is not None:
                return cls(sent, delivered, text_seen, "error", item.error())
            end = {Close: "close", Unfinished: "unfinished", Drop: "drop"}.get(type(item))
            if end is not None:
                return cls(sent, delivered, text_seen, end, None)
            if isinstance(item, Data) and not text_seen:
                if item.text:
                    text_seen = True
                else:
                    delivered += item.payload
        return cls(items, delivered, text_seen, "open", None)


@dataclass(frozen=True)
class FramesCase:
    interactive: bool
    fd: str  # the socket the frames go to; the others are normal clients
    items: tuple[Item, ...]


def frames_cases(big: bool) -> st.SearchStrategy[FramesCase]:
    items = st.lists(st.one_of(ITEMS, BIG) if big else ITEMS, max_size=8).map(tuple)
    return st.one_of(
        st.builds(FramesCase, st.just(False), st.sampled_from(["0", "0", "1", "2", "control"]), items),
        st.builds(FramesCase, st.just(True), st.sampled_from(["0", "control"]), items),
    )


async def ws_frames(fz: Fuzz, case: FramesCase) -> None:
    """A cat whose one socket gets the frames: the data due is delivered, a protocol error closes that
    socket with its code, the command ends by what the client does (never a cancel), and the server
    closes every socket at the end."""
    plan = Plan.of(case.items)
    op = await fz.exec_op(["cat"], interactive=case.interactive)
    async with attached(fz, op, skip=case.fd) as session:
        path = f"/1.0/operations/{op['id']}/websocket?secret={op['metadata']['fds'][case.fd]}"
        raw = await within(fw.connect(fz.socket, path, REQUEST_TIMEOUT, close_on_barrier=case.interactive),
                           REQUEST_TIMEOUT + 2, "raw handshake")
        assert isinstance(raw, fw.RawSocket), f"upgrade refused: {raw}"
        try:
            await _send(raw, plan, case)
            await _end_input(session, raw, plan, case)
            final, got = await session.ended(fz)
            _check(plan, case, final["metadata"].get("return"), got, final["err"])
            if plan.end == "open":
                await within(raw.closed(REQUEST_TIMEOUT), REQUEST_TIMEOUT + 1, "the server to close the raw socket")
        finally:
            await raw.aclose()


async def _send(raw: fw.RawSocket, plan: Plan, case: FramesCase) -> None:
    """The items; then the server closes a socket it failed with the error's code."""
    for item in plan.items:
        if not await raw.send_frames(item.frames()):
            break
    if plan.end in ("unfinished", "drop"):
        raw.abort()
    elif plan.end in ("error", "close"):
        await within(raw.closed(REQUEST_TIMEOUT), REQUEST_TIMEOUT + 1, f"the server to close after {plan.end}")
        if plan.end == "error" and not (case.fd == "0" and plan.text_seen):  # else cat may have ended first
            assert raw.close_code == plan.code or (raw.close_code is None and not plan.close_seen), \
                f"closed with {raw.close_code}, {plan.code} expected"


async def _end_input(session: Session, raw: fw.RawSocket, plan: Plan, case: FramesCase) -> None:
    """What makes the command end: EOF on its stdin (non-interactive), a SIGKILL request (interactive),
    or nothing when the control socket was lost (that kills it)."""
    if case.interactive:
        if case.fd != "control":
            await session.send("control", KILL)
        elif not plan.lost:
            await raw.send_frames([fw.Frame(fw.TEXT, KILL.encode())])
    elif case.fd == "0":
        if not plan.lost and not plan.text_seen:
            await raw.send_frames([fw.Frame(fw.TEXT, b"")])
    elif not (case.fd == "control" and plan.lost) and await session.send("0", b"hello"):
        await session.send("0", "")


def _check(plan: Plan, case: FramesCase, code: int | None, got: dict[str, bytes], err: str) -> None:
    signalled = case.fd == "control" and any(isinstance(i, Data) and may_signal(i.payload) for i in plan.items)
    if case.interactive:
        assert signalled or case.fd != "control" or code == 137, f"SIGKILL: return {code}"
    elif case.fd == "0":
        echoed = got["1"] == plan.delivered if plan.exact else plan.delivered.startswith(got["1"])
        assert code == 0 and echoed, f"stdin: {len(plan.delivered)} bytes sent, {len(got['1'])} echoed, return {code}"
    elif case.fd == "control" and plan.lost:
        assert code == 137, f"control lost: return {code}"
    elif not signalled:
        assert code == 0, f"return {code}, {err!r}"
        assert case.fd == "1" or got["1"] == b"hello", got["1"][:200]
