"""Pure exec rules: validation texts, environment defaulting, control parsing, exit mapping."""

from __future__ import annotations

import json

import pytest

from core.errors import BadRequest
from core.execspec import (
    DEFAULT_PATH,
    Resize,
    Signal,
    build_environment,
    exit_result,
    find_socket,
    parse_control,
    parse_exec_post,
    required_sockets,
    socket_secrets,
)


def body(**kw: object) -> bytes:
    return json.dumps({"command": ["true"], **kw}).encode()


def test_pylxd_nulls_accepted() -> None:
    post = parse_exec_post(body(environment=None, user=None, group=None, cwd=None, **{"wait-for-websocket": True}))
    assert post.user is None and post.cwd is None and post.wait_for_websocket


def test_unknown_fields_ignored() -> None:
    assert parse_exec_post(body(whatever=1)).command == ["true"]


@pytest.mark.parametrize("kw, text", [
    ({"record-output": True, "wait-for-websocket": True},
     'Cannot use "record-output" in combination with "wait-for-websocket"'),
    ({"record-output": True, "interactive": True},
     'Cannot use "interactive" in combination with "record-output"'),
])
def test_exclusive_flags(kw: dict[str, object], text: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_exec_post(body(**kw))
    assert exc.value.message == text


@pytest.mark.parametrize("raw", [b"{", b"[]", b'{"command": "ls"}', b'{"command": ["ls"], "user": -1}', b""])
def test_malformed(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_exec_post(raw)


def test_empty_command_rejected() -> None:
    with pytest.raises(BadRequest):
        parse_exec_post(json.dumps({"command": []}).encode())


def test_environment_defaults_in_order() -> None:
    env = build_environment({"A": "1"}, {"environment.A": "no", "environment.B": "2", "other": "x"}, 0,
                            lambda p: False)
    assert env == {"A": "1", "B": "2", "PATH": DEFAULT_PATH, "HOME": "/root", "USER": "root", "LANG": "C.UTF-8"}


def test_environment_non_root_and_extra_paths() -> None:
    env = build_environment(None, {}, 1000, lambda p: p == "/snap")
    assert "HOME" not in env and "USER" not in env
    assert env["PATH"] == DEFAULT_PATH + ":/snap/bin"


def test_environment_keeps_given_path() -> None:
    assert build_environment({"PATH": "/x"}, {}, 0, lambda p: True)["PATH"] == "/x"


def test_socket_layout() -> None:
    assert set(socket_secrets(False)) == {"0", "1", "2", "control"}
    assert set(socket_secrets(True)) == {"0", "control"}
    assert required_sockets(False) == {"0", "1", "2"}
    assert required_sockets(True) == {"0", "control"}
    fds = socket_secrets(False)
    assert all(len(s) == 64 and int(s, 16) >= 0 for s in fds.values())
    assert find_socket(fds, fds["2"]) == "2"
    assert find_socket(fds, "nope") is None


@pytest.mark.parametrize("msg, interactive, action", [
    ('{"command":"window-resize","args":{"width":"120","height":"40"}}', True, Resize(120, 40)),
    ('{"command":"window-resize","args":{"width":120,"height":40}}', True, Resize(120, 40)),
    ('{"command":"window-resize","args":{"width":"120","height":"40"}}', False, None),
    ('{"command":"window-resize","args":{"width":"x","height":"40"}}', True, None),
    ('{"command":"window-resize","args":null}', True, None),
    ('{"command":"signal","args":null,"signal":15}', False, Signal(15)),
    ('{"command":"signal","signal":"15"}', False, None),
    ('{"command":"signal","signal":0}', False, None),
    ('{"command":"nope"}', True, None),
    ("not json", True, None),
    ("[1]", True, None),
    # found by tests/test_fuzz.py: these raised out of the control loop, which then ignored the socket
    ("[" * 5000 + "]" * 5000, True, None),  # RecursionError
    ('{"command":"window-resize","args":{"width":Infinity,"height":40}}', True, None),  # OverflowError
    ('{"command":"window-resize","args":{"width":1e999,"height":40}}', True, None),
    (b'{"command":"signal","signal":9}', False, Signal(9)),  # a binary frame on the control socket
])
def test_control_messages(msg: str | bytes, interactive: bool, action: object) -> None:
    assert parse_control(msg, interactive) == action


@pytest.mark.parametrize("code, err", [(0, ""), (1, ""), (137, ""), (143, ""),
                                       (126, "Command not executable"), (127, "Command not found")])
def test_exit_mapping(code: int, err: str) -> None:
    assert exit_result(code).code == code and exit_result(code).error == err
