"""Pure exec rules of the Incus contract: request validation (§3.2), environment defaulting (§3.3),
socket layout (§3.4, §5.2), control messages (§5.6) and exit status mapping (§5.9). No IO."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import BadRequest

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXTRA_PATHS = (("/snap", "/snap/bin"), ("/etc/NIXOS", "/run/current-system/sw/bin"))
CONTROL = "control"


MAX_TIMEOUT = 30 * 86400  # seconds (exec_timeout)
TIMEOUT_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of a timed-out command's process group
TIMEOUT_EXIT = 124  # what coreutils' timeout returns


def check_timeout(v: float | None) -> float | None:
    if v is not None and not 0 < v <= MAX_TIMEOUT:
        raise ValueError(f"must be more than 0 and at most {MAX_TIMEOUT} seconds")
    return v


def timed_out(seconds: float) -> ExitResult:
    """What a command stopped at its timeout ends with: exit 124 and the operation's error."""
    return ExitResult(TIMEOUT_EXIT, f"Command timed out after {seconds:g} s")


class ExecPost(BaseModel):
    """``InstanceExecPost``: unknown keys ignored, nulls accepted where clients send them."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    command: list[str]
    environment: dict[str, str] | None = None
    wait_for_websocket: bool = Field(False, alias="wait-for-websocket")
    interactive: bool = False
    width: int = 0
    height: int = 0
    record_output: bool = Field(False, alias="record-output")
    user: int | None = None
    group: int | None = None
    cwd: str | None = None
    timeout: float | None = None  # extension exec_timeout: seconds until the command is stopped
    record_session: bool = Field(False, alias="record-session")  # extension exec_recording: asciicast v2
    record_stdin: bool = Field(False, alias="record-stdin")  # ... with the input too
    detachable: bool = False  # extension exec_detach: runs on without clients, output kept for a reattach
    buffer_size: int | None = Field(None, alias="buffer-size")  # ... bytes kept per output stream

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        return check_timeout(v)

    @field_validator("user", "group")
    @classmethod
    def _uint32(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**32:
            raise ValueError("must be an unsigned 32-bit integer")
        return v

    @field_validator("width", "height")
    @classmethod
    def _terminal_size(cls, v: int) -> int:
        if not 0 <= v < 2**16:
            raise ValueError("must be between 0 and 65535")
        return v

    @field_validator("command")
    @classmethod
    def _command_text(cls, v: list[str]) -> list[str]:
        if any("\0" in a for a in v):
            raise ValueError("must not contain NUL bytes")
        return v

    @field_validator("environment")
    @classmethod
    def _environment_text(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and any("\0" in k or "\0" in val or "=" in k or not k for k, val in v.items()):
            raise ValueError("names must be non-empty, without '=' or NUL bytes; values without NUL bytes")
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd_text(cls, v: str | None) -> str | None:
        if v is not None and "\0" in v:
            raise ValueError("must not contain NUL bytes")
        return v


def parse_exec_post(body: bytes) -> ExecPost:
    """Parse and check the request (validation steps 2-4); raises BadRequest with the exact texts."""
    try:
        post = ExecPost.model_validate_json(body)
    except ValueError as exc:
        raise BadRequest(first_error(exc)) from None
    if post.record_output and post.wait_for_websocket and not post.detachable:  # a detachable exec may keep both
        raise BadRequest('Cannot use "record-output" in combination with "wait-for-websocket"')
    if post.interactive and post.record_output:
        raise BadRequest('Cannot use "interactive" in combination with "record-output"')
    if not post.command:
        raise BadRequest("Command is required")
    return post


def first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first["msg"]).removeprefix("Value error, ")  # our validators' own words, as written
        return f"{where}: {message}" if where else message
    return str(exc)


def build_environment(
    requested: dict[str, str] | None,
    instance_config: dict[str, str],
    user: int,
    path_exists: Callable[[str], bool],
) -> dict[str, str]:
    """The exact process environment (spec §3.3, in that order)."""
    env = dict(requested or {})
    for key, value in instance_config.items():
        if key.startswith("environment."):
            env.setdefault(key[len("environment."):], value)
    if "PATH" not in env:
        path = DEFAULT_PATH
        for marker, extra in EXTRA_PATHS:
            if path_exists(marker):
                path = f"{path}:{extra}"
        env["PATH"] = path
    if user == 0:
        env.setdefault("HOME", "/root")
        env.setdefault("USER", "root")
    env.setdefault("LANG", "C.UTF-8")
    return env


def socket_secrets(interactive: bool) -> dict[str, str]:
    """fd name -> 64 hex secret: 0 and control when interactive, else 0, 1, 2 and control."""
    names = ["0", CONTROL] if interactive else ["0", "1", "2", CONTROL]
    pool = secrets.token_hex(32 * len(names))  # one read of the system's randomness for all of them
    return {name: pool[64 * i:64 * (i + 1)] for i, name in enumerate(names)}


def required_sockets(interactive: bool) -> frozenset[str]:
    """The sockets the command waits for (§5.2): control is optional when non-interactive."""
    return frozenset({"0", CONTROL}) if interactive else frozenset({"0", "1", "2"})


def find_socket(fds: dict[str, str], secret: str) -> str | None:
    """The fd whose secret matches, compared in constant time."""
    found = None
    for name, value in fds.items():
        if secrets.compare_digest(value.encode(), secret.encode()):
            found = name
    return found


@dataclass(frozen=True)
class Resize:
    width: int
    height: int


@dataclass(frozen=True)
class Signal:
    signum: int


ControlAction = Resize | Signal | None


def parse_control(message: str | bytes, interactive: bool) -> ControlAction:
    """A control-socket message (§5.6): bad JSON, unknown commands and bad args are ignored (None)."""
    try:
        msg: Any = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        return None
    if not isinstance(msg, dict):
        return None
    command = msg.get("command")
    if command == "window-resize" and interactive:
        args = msg.get("args") or {}
        try:
            width, height = int(args["width"]), int(args["height"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int() of Infinity
            return None
        if not (0 < width < 2**16 and 0 < height < 2**16):
            return None
        return Resize(width, height)
    if command == "signal":
        signum = msg.get("signal")
        if isinstance(signum, int) and not isinstance(signum, bool) and 0 < signum < 65:
            return Signal(signum)
    return None


@dataclass(frozen=True)
class ExitResult:
    code: int
    error: str  # "" → Success; otherwise the operation fails with this text


def exit_result(code: int) -> ExitResult:
    """§5.9: 126/127 fail the operation with the exact texts; everything else succeeds."""
    if code == 127:
        return ExitResult(127, "Command not found")
    if code == 126:
        return ExitResult(126, "Command not executable")
    return ExitResult(code, "")
