"""Bad input anywhere gets the Incus error envelope with a clear message, and the agent keeps serving."""

from __future__ import annotations

import pytest

from tests.conftest import Broker
from tests.wsutil import Raw

pytestmark = pytest.mark.broker

CASES = [
    ("POST", "/1.0/instances", b"[]", 400),
    ("POST", "/1.0/instances", b"{", 400),
    ("POST", "/1.0/instances", b'{"name": 5}', 400),
    ("POST", "/1.0/instances", b'{"name": "bad name!"}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok1", "source": {"alias": "nonexistent-image"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok2", "config": {"a": 1}}', 400),
    ("POST", "/1.0/instances", b'{"name": "c1"}', 409),
    ("POST", "/1.0/instances", b'{"name": "ok3", "source": {"type": "image", "fingerprint": "00ff"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok4", "source": {"type": "migration"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok5", "config": {"limits.memory": "lots"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok6", "config": {"limits.processes": "1"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok8", "config": {"limits.memory": "' + b"9" * 400 + b'TB"}}', 400),
    ("POST", "/1.0/instances", '{"name": "ok9", "config": {"limits.processes": "\u00b2"}}'.encode(), 400),
    ("POST", "/1.0/instances", b'{"name": "ok10", "config": {"limits.cpu": "99999"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok11", "config": {"limits.processes": "99999999999"}}', 400),
    ("POST", "/1.0/instances", b'{"name": "ok7", "config": {"security.no_new_privs": "maybe"}}', 400),
    ("PUT", "/1.0/instances/c1", b'{"config": {"limits.cpu": "many"}}', 400),
    ("PUT", "/1.0/instances/nope", b'{"config": {}}', 404),
    ("GET", "/1.0/images/00ff00", None, 404),
    ("GET", "/1.0/images/aliases/nope", None, 404),
    ("POST", "/1.0/images", b"{}", 400),
    ("DELETE", "/1.0/images/aliases/busybox", None, 400),
    ("PUT", "/1.0/instances/c1/state", b'{"action": "explode"}', 400),
    ("PUT", "/1.0/instances/c1/state", b'{"action": "stop", "timeout": "soon"}', 400),
    ("PUT", "/1.0/instances/nope/state", b'{"action": "start"}', 404),
    ("PATCH", "/1.0/instances/c1", b'{"config": ["x"]}', 400),
    ("PATCH", "/1.0/instances/c1", b"not json", 400),
    ("DELETE", "/1.0/instances/c1", None, 400),
    ("DELETE", "/1.0/instances/nope", None, 404),
    ("GET", "/1.0/instances?recursion=x", None, 400),
    ("GET", "/1.0/instances?project=p2", None, 404),
    ("GET", "/1.0/operations?all-projects=true&project=default", None, 400),
    ("GET", "/1.0/operations/nope", None, 404),
    ("DELETE", "/1.0/operations/nope", None, 404),
    ("GET", "/1.0/operations/nope/wait?timeout=1", None, 404),
    ("POST", "/1.0/instances/c1/exec", b'{"command": "ls"}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["ls"], "user": "root"}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["ls"], "width": "wide"}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["ls"], "environment": {"A": 1}}', 400),
    # NUL bytes cannot reach execve: refused before anything is spawned (spec: a C string ends at NUL)
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["echo", "a\\u0000b"]}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["echo"], "environment": {"A": "x\\u0000y"}}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["echo"], "environment": {"A\\u0000": "x"}}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["echo"], "environment": {"A=B": "x"}}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["pwd"], "cwd": "/tmp\\u0000x"}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["sh"], "interactive": true, "width": 70000}', 400),
    ("POST", "/1.0/instances/c1/exec", b'{"command": ["sh"], "interactive": true, "height": -1}', 400),
    ("POST", "/1.0/instances/c1/exec", b"x" * ((1 << 20) + 1), 413),  # over the body limit: refused unread
    ("GET", "/1.0/instances/c1/logs/exec-output/exec_..%2Fx.stdout", None, 400),  # one segment: a bad name (LXD)
    ("GET", "/1.0/instances/c1/logs/exec-output/%2E%2E", None, 400),
    ("DELETE", "/1.0/instances/c1/logs/exec-output/exec_nope.stdout", None, 404),
    ("PUT", "/1.0/operations", None, 501),
    ("GET", "/1.0/nothing/here", None, 404),
    ("GET", "/1.0/cluster/members/nobody", None, 404),
]


@pytest.mark.parametrize("method, path, body, status", CASES)
def test_error_envelope(broker: Broker, c1: str, method: str, path: str, body: bytes | None, status: int) -> None:
    with broker.http() as c:
        r = c.request(method, path, content=body)
        assert r.status_code == status, r.text
        doc = r.json()
        assert doc["type"] == "error" and doc["error_code"] == status and doc["error"], doc
        assert c.get("/1.0").status_code == 200  # still serving


@pytest.mark.parametrize("raw, error", [
    ("9" * 400, "value out of range"),  # was a 500 'int too large to convert to float' (found by test_fuzz.py)
    ("9223372036854775808", "value out of range"),
    ("5_0", "invalid syntax"),  # Python's int() took these; Go's strconv.Atoi does not
    (" 1", "invalid syntax"),
    ("\u0661", "invalid syntax"),
    ("1.5", "invalid syntax"),
])
def test_wait_timeout_parsed_as_incus_does(broker: Broker, raw: str, error: str) -> None:
    """``?timeout=`` is Go's strconv.Atoi (spec §4.3): anything else is Incus' 500 with its text."""
    with broker.http() as c:
        r = c.get("/1.0/operations/nope/wait", params={"timeout": raw})
        assert r.status_code == 500 and r.json()["error"] == f'strconv.Atoi: parsing "{raw}": {error}', r.text
        for ok in ("+0", "-0", "0000000000000000000000001", "9223372036854775807"):
            assert c.get("/1.0/operations/nope/wait", params={"timeout": ok}).status_code == 404, ok


@pytest.mark.parametrize("path", ["/1.0/nothing", "/1.0/operations/a%2Fb/websocket", "/1.0/instances/c1/exec"])
async def test_websocket_to_no_route(broker: Broker, path: str) -> None:
    """An upgrade that no websocket route takes is refused like any unknown path, with the 404 envelope
    (Starlette answered a bare 403; found by tests/test_fuzz.py)."""
    status, doc = await Raw(broker.socket).handshake_status(f"ws://eb{path}")
    assert status == 404 and doc["type"] == "error" and doc["error_code"] == 404, (status, doc)
    assert broker.api("GET", "/1.0")["status_code"] == 200
