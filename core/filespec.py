"""The files API's wire rules (``/1.0/instances/{name}/files?path=``): what the request headers say
(uid, gid, mode, type, write), the response headers for a path, and the path itself.

lxd-client 5.0.2 sends and reads only the ``X-LXD-*`` names, Incus clients the ``X-Incus-*`` ones: both
are read (Incus' first) and both are sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from urllib.parse import quote

from core.errors import BadRequest

PREFIXES = ("x-incus-", "x-lxd-")
FILE_TYPES = ("file", "directory", "symlink")
WRITE_MODES = ("overwrite", "append")
MAX_PATH = 4096
MAX_SYMLINK_TARGET = 4096


@dataclass(frozen=True)
class PushSpec:
    """What a POST asks for. -1: not given (a new file gets 0:0 and 0644, a new directory 0750)."""

    uid: int = -1
    gid: int = -1
    mode: int = -1  # applied, with the ids, only to what the request creates (as LXD)
    type: str = "file"
    write: str = "overwrite"


def instance_path(raw: str | None) -> str:
    """The absolute path inside the instance a ``?path=`` names; a relative one is taken from ``/`` (the
    5.0.2 client sends the parents it creates under ``-p`` without their leading slash)."""
    if not raw:
        raise BadRequest("Missing path argument")
    if "\0" in raw or len(raw) > MAX_PATH:
        raise BadRequest("Invalid path argument")
    return "/" + raw.lstrip("/")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for prefix in PREFIXES:
        value = headers.get(prefix + name)
        if value is not None:
            return value.strip()
    return None


def _id(headers: Mapping[str, str], name: str) -> int:
    raw = _header(headers, name)
    if raw is None or raw == "":
        return -1
    try:
        value = int(raw, 10)
    except ValueError:
        raise BadRequest(f"Invalid {name} header: {raw[:40]!r}") from None
    if not -1 <= value < 1 << 32:
        raise BadRequest(f"Invalid {name} header: {raw[:40]!r}")
    return value


def _mode(headers: Mapping[str, str]) -> int:
    raw = _header(headers, "mode")
    if raw is None or raw == "" or raw == "-1":
        return -1
    try:
        value = int(raw, 8)  # "0644" from lxc, "644" from others: octal either way
    except ValueError:
        raise BadRequest(f"Invalid mode header: {raw[:40]!r}") from None
    if not 0 <= value <= 0o7777:
        raise BadRequest(f"Invalid mode header: {raw[:40]!r}")
    return value


def parse_push(headers: Mapping[str, str]) -> PushSpec:
    """The headers of a POST (``headers`` with lower-case names)."""
    kind = _header(headers, "type") or "file"
    if kind not in FILE_TYPES:
        raise BadRequest(f"Bad file type: {kind[:40]}")
    write = _header(headers, "write") or "overwrite"
    if write not in WRITE_MODES:
        raise BadRequest(f"Bad file write mode: {write[:40]}")
    return PushSpec(_id(headers, "uid"), _id(headers, "gid"), _mode(headers), kind, write)


def response_headers(kind: str, uid: int, gid: int, mode: int, mtime_ns: int) -> dict[str, str]:
    """What a GET or HEAD of a path answers with, under both names (``modified`` as LXD writes it:
    ``2026-12-01 21:52:10 +0000 UTC``), and ``Last-Modified``."""
    seconds = mtime_ns // 1_000_000_000
    try:
        modified = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
    except (OverflowError, ValueError, OSError):  # an mtime past year 9999 (touch -d can set one)
        seconds = 0
        modified = "1970-01-01 00:00:00 +0000 UTC"
    values = {"uid": str(uid), "gid": str(gid), "mode": f"{mode & 0o7777:04o}", "type": kind, "modified": modified}
    headers = {f"{prefix}{name}": value for prefix in ("X-Incus-", "X-LXD-") for name, value in values.items()}
    headers["Last-Modified"] = formatdate(seconds, usegmt=True)
    return headers


def content_disposition(path: str) -> str:
    """``inline;filename=<name>`` as LXD sends it, for any name: ASCII as is, anything else (and quotes,
    control characters) percent-encoded in ``filename*``."""
    name = path.rstrip("/").rsplit("/", 1)[-1] or "/"
    if name.isascii() and name.isprintable() and not any(c in name for c in '";\\'):
        return f"inline;filename={name}"
    return f"inline;filename*=UTF-8''{quote(name.encode('utf-8', 'surrogateescape'), safe='')}"
