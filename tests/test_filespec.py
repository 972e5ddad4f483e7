"""The files API's wire rules: request headers (both families), paths, response headers."""

from __future__ import annotations

import pytest

from core.errors import BadRequest
from core.filespec import PushSpec, content_disposition, instance_path, parse_push, response_headers


def test_defaults_and_both_header_families() -> None:
    assert parse_push({}) == PushSpec()
    lxd = {"x-lxd-uid": "1000", "x-lxd-gid": "1001", "x-lxd-mode": "0640", "x-lxd-type": "directory"}
    assert parse_push(lxd) == PushSpec(1000, 1001, 0o640, "directory", "overwrite")
    incus = {"x-incus-uid": "5", "x-lxd-uid": "6", "x-incus-write": "append", "x-incus-mode": "755"}
    assert parse_push(incus) == PushSpec(5, -1, 0o755, "file", "append")  # Incus' name first; octal always


@pytest.mark.parametrize("headers, message", [
    ({"x-lxd-type": "fifo"}, "Bad file type: fifo"),
    ({"x-lxd-write": "prepend"}, "Bad file write mode: prepend"),
    ({"x-lxd-uid": "root"}, "Invalid uid header: 'root'"),
    ({"x-lxd-gid": "-2"}, "Invalid gid header: '-2'"),
    ({"x-lxd-uid": str(1 << 32)}, f"Invalid uid header: '{1 << 32}'"),
    ({"x-lxd-mode": "0999"}, "Invalid mode header: '0999'"),
    ({"x-lxd-mode": "17777"}, "Invalid mode header: '17777'"),
])
def test_bad_headers_are_refused(headers: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_push(headers)
    assert err.value.message == message


def test_paths() -> None:
    assert instance_path("/etc/hostname") == "/etc/hostname"
    assert instance_path("opt/app") == "/opt/app"  # what lxc 5.0.2 sends for parents under -p
    for bad in (None, "", "a\0b", "/" + "x" * 5000):
        with pytest.raises(BadRequest):
            instance_path(bad)


def test_response_headers() -> None:
    h = response_headers("file", 1000, 1001, 0o4755, 1_764_626_000_123_456_789)
    for prefix in ("X-LXD-", "X-Incus-"):
        assert (h[prefix + "uid"], h[prefix + "gid"], h[prefix + "mode"], h[prefix + "type"]) == \
            ("1000", "1001", "4755", "file")
        assert h[prefix + "modified"] == "2025-12-01 21:53:20 +0000 UTC"
    assert h["Last-Modified"] == "Mon, 01 Dec 2025 21:53:20 GMT"
    assert response_headers("directory", 0, 0, 0o755, 0)["X-LXD-mode"] == "0755"


def test_content_disposition_for_any_name() -> None:
    assert content_disposition("/etc/hostname") == "inline;filename=hostname"
    assert content_disposition("/tmp/文件.txt") == "inline;filename*=UTF-8''%E6%96%87%E4%BB%B6.txt"
    assert content_disposition("/tmp/a\r\nb") == "inline;filename*=UTF-8''a%0D%0Ab"
    assert content_disposition("/") == "inline;filename=/"


def test_far_mtimes_do_not_break_the_headers() -> None:
    h = response_headers("file", 0, 0, 0o644, 300_000_000_000 * 10**9)
    assert h["X-LXD-modified"] == "1970-01-01 00:00:00 +0000 UTC"
