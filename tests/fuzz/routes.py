"""Route targets: the operation routes (``GET/DELETE /1.0/operations/{id}``, ``/wait?timeout=``,
``/websocket?secret=&offset=``) on live, cancelled, ended and made-up operations, and instance names in
paths and in ``POST /1.0/instances``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import strategies as st

from tests.fuzz import wire as fw
from tests.fuzz.props import REQUEST_TIMEOUT, Fuzz, Reply, check_reply, within
from tests.fuzz.values import SURROGATES, TEXT, dumps, quoted, weighted

# ---- operations ---------------------------------------------------------------------------------------------

# ?timeout= values: Go's Atoi takes [+-]digits up to int64 and nothing else (spec §4.3: else a 500).
# On a live operation only the ones that cannot wait long (the operation would end in its own 10 s).
SHORT_TIMEOUTS = ["0", "1", "", "x", "-0", "+0", "+1", " 1", "1 ", "1.5", "1e3", "0x1", "\u0660", "\u0661", "5_0",
                  "00000000000000000000001", "9" * 30, "9" * 400, "9" * 5000, "-9" + "9" * 30]
TIMEOUTS = st.one_of(st.sampled_from([*SHORT_TIMEOUTS, "-1", "9" * 19, "-5"]), st.integers(-2, 2**70).map(str), TEXT)
# a websocket secret: "=0" is socket 0's real one; "=0+x" it with x after, "=0-" one character short,
# "=0^" in upper case; anything else is sent as it is
SECRETS = st.one_of(st.sampled_from(["=0", "=1", "=2", "=control", "=0", "=1+x", "=0-", "=0^", ""]), TEXT)


@dataclass(frozen=True)
class OpCase:
    target: str  # "live" (a websocket exec waiting for its sockets), "cancelled", "task" (ended), "made-up"
    made_up: str  # the id, when made up
    route: str  # "", "/wait", "/websocket", ...
    method: str
    secrets: tuple[str, ...]  # websocket: one attempt each
    timeout: str
    query: tuple[tuple[str, str], ...]


def _op_cases(target: str) -> st.SearchStrategy[OpCase]:
    return st.builds(
        OpCase, st.just(target),
        st.one_of(TEXT, st.uuids().map(str), st.sampled_from(["..", ".", "%2e%2e", "a/b", "x" * 5000])),
        st.sampled_from(["", "", "/wait", "/wait", "/websocket", "/websocket", "/nothing"]),
        st.sampled_from(["GET", "GET", "GET", "DELETE", "POST", "PUT", "HEAD"]),
        st.lists(SECRETS, min_size=1, max_size=3).map(tuple),
        st.sampled_from(SHORT_TIMEOUTS) if target == "live" else TIMEOUTS,
        st.lists(st.tuples(st.sampled_from(["offset", "project", "recursion", "public", "x"]),
                           st.one_of(TEXT, st.integers(-2, 2**64).map(str))), max_size=3).map(tuple),
    )


OP_CASES = st.sampled_from(["live", "live", "cancelled", "task", "made-up"]).flatmap(_op_cases)


def _secret(spec: str, fds: dict[str, str]) -> str:
    if not spec.startswith("="):
        return spec
    real = fds.get(spec[1:].rstrip("-^").split("+")[0], "")
    if spec.endswith("-"):
        return real[:-1]
    if spec.endswith("^"):
        return real.upper()
    return real + spec.partition("+")[2]


async def _operation(fz: Fuzz, target: str) -> dict[str, Any] | None:
    if target in ("live", "cancelled"):
        op = await fz.exec_op(["cat"])
        if target == "cancelled":
            await fz.finish(op, cancel=True)
        return op
    if target == "task":
        r, doc = await fz.call("POST", f"/1.0/instances/{fz.instance}/exec", b'{"command": ["true"]}')
        assert r.status == 202 and doc is not None
        await fz.finish(doc["metadata"])
        return dict(doc["metadata"])
    return None


async def operations(fz: Fuzz, case: OpCase) -> None:
    """Any request on an operation's routes: an envelope; an upgrade only with a live one's real secret."""
    op = await _operation(fz, case.target)
    fds: dict[str, str] = op["metadata"].get("fds", {}) if op is not None else {}
    url = f"/1.0/operations/{quoted(op['id'] if op is not None else case.made_up)}{case.route}"
    query = [*case.query, *((("timeout", case.timeout),) if case.route == "/wait" else ())]
    upgraded: list[fw.RawSocket] = []
    try:
        if case.route == "/websocket" and case.method == "GET":
            for spec in case.secrets:
                q = "&".join(f"{quoted(k)}={quoted(v)}" for k, v in [*query, ("secret", _secret(spec, fds))])
                got = await within(fw.connect(fz.socket, f"{url}?{q}", REQUEST_TIMEOUT), REQUEST_TIMEOUT + 2,
                                   f"websocket handshake {url}?{q:.200}")
                if isinstance(got, fw.RawSocket):
                    upgraded.append(got)
                    assert case.target == "live" and spec.lstrip("=") in fds, f"upgraded: {case.target}, {spec!r}"
                else:
                    check_reply(Reply(got.status, httpx.Headers(got.headers), got.body, "GET", f"upgrade {url}?{q:.200}"))
        else:
            q = "&".join(f"{quoted(k)}={quoted(v)}" for k, v in query)
            await fz.call(case.method, f"{url}?{q}" if q else url)
    finally:
        for sock in upgraded:
            await sock.aclose()
        if op is not None and case.target == "live":
            await fz.finish(op, cancel=True)


# ---- instance names -----------------------------------------------------------------------------------------

NAMES = weighted(
    (1, st.from_regex(r"\A[a-z][a-z0-9-]{0,62}\Z")),
    (1, st.text(max_size=70)),
    (1, SURROGATES),
    (1, st.sampled_from(["c1", "fz-run", "fz-stop", "C1", "c1/snap0", "c1/..", "..", ".", "", "-a", "a-", "1a",
                         "a" * 63, "a" * 64, "a/b", "%2F", "c1\x00", "c1 ", " c1", "c1\n", "\u0109" + "1", "c1?x",
                         "c1#x", "c1;x", "c1%00", "default_c1", "a" * 5000])),
)
ROUTES = [  # nothing here changes an instance that exists
    ("GET", "/1.0/instances/{}", None),
    ("GET", "/1.0/instances/{}?recursion=1", None),
    ("GET", "/1.0/instances/{}/state", None),
    ("PUT", "/1.0/instances/{}/state", b'{"action": "fz-no-such-action"}'),
    ("POST", "/1.0/instances/{}/exec", b'{"command": ["true"]}'),
    ("GET", "/1.0/instances/{}/files?path=/", None),
    ("GET", "/1.0/instances/{}/logs/exec-output", None),
    ("GET", "/1.0/instances/{}/logs/exec-output/exec_x.stdout", None),
    ("GET", "/1.0/instances/{}/snapshots", None),
    ("GET", "/1.0/operations/{}", None),
    ("POST", "/1.0/instances", None),  # the name in the body, and an image that does not exist
]


@dataclass(frozen=True)
class NameCase:
    name: str
    route: int
    dots: bool  # "." sent as %2E (else a bare "." or ".." segment is resolved by the client)
    project: str | None


NAME_CASES = st.builds(NameCase, NAMES, st.integers(0, len(ROUTES) - 1), st.booleans(),
                       st.one_of(st.none(), st.none(), st.sampled_from(["default", "nope", ""]), TEXT))


async def names(fz: Fuzz, case: NameCase) -> None:
    """Any name on any instance route: an envelope; a refused create leaves nothing behind."""
    method, template, body = ROUTES[case.route]
    segment = quoted(case.name).replace(".", "%2E") if case.dots else quoted(case.name)
    url = template.format(segment)
    if case.project is not None:
        url += ("&" if "?" in url else "?") + f"project={quoted(case.project)}"
    if body is not None or method != "POST":
        r, doc = await fz.call(method, url, body)
        if r.status == 202 and doc is not None:
            await fz.finish(doc["metadata"])
        return
    body = dumps({"name": case.name, "source": {"type": "image", "alias": "fz-no-such-image"}}, False)
    existing = await _instances(fz)
    r, _ = await fz.call(method, url, body)
    assert r.status in (400, 404, 409), f"create {case.name!r}: {r.status} {r.body[:200]!r}"
    again, _ = await fz.call(method, url, body)  # no claim on the name was left behind
    assert again.status == r.status, f"create {case.name!r} again: {again.status} after {r.status}"
    assert await _instances(fz) == existing, "a refused create changed the instances"


async def _instances(fz: Fuzz) -> set[str]:
    r, doc = await fz.call("GET", "/1.0/instances?recursion=1")
    assert r.status == 200 and doc is not None
    return {i["name"] for i in doc["metadata"]}
