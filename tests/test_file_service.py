"""The file service without a running instance: its operations on a rootfs (what a stopped instance
gets: lookups inside it, ids through its range, nothing outside touched) and the agent's checks of
pid1's answers (untrusted input: wrong kinds of fds are closed and refused)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import ApiError, BadRequest, Forbidden
from node_agent.runtime import idranges
from node_agent.runtime.instance_files import FileFailed, _take, on_rootfs
from node_agent.runtime.pid1.server import ID_RANGE
from node_agent.runtime.spawn import Pid1Unavailable

BASE = 3_000_000  # an id range nobody uses on the test host
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown into an id range needs root")


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("inst\n")
    (root / "tmp").mkdir()
    (root / "tmp" / "up").symlink_to("../../../../../../etc")
    (root / "tmp" / "abs").symlink_to("/")
    if os.geteuid() == 0:
        for path in [root, *root.rglob("*")]:
            os.lchown(path, BASE, BASE)
    yield root


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_root
def test_lookups_stay_inside_the_rootfs(rootfs: Path) -> None:
    for path in ("/tmp/up/hostname", "/tmp/abs/etc/hostname", "/../../etc/hostname"):
        info, fd = on_rootfs(rootfs, BASE, "open", path)
        assert fd is not None
        with os.fdopen(fd, "rb") as f:
            assert f.read() == b"inst\n", path  # the instance's file, never the host's /etc/hostname
        assert (info.type, info.uid, info.gid) == ("file", 0, 0)
    with pytest.raises(FileFailed) as err:
        on_rootfs(rootfs, BASE, "open", "/tmp/abs/etc/shadow")
    assert err.value.status == 404


@needs_root
def test_created_files_belong_to_the_instance(rootfs: Path) -> None:
    info, fd = on_rootfs(rootfs, BASE, "write", "/tmp/abs/etc/new", uid=33, gid=34, mode=0o640)
    assert fd is not None and info.created
    os.write(fd, b"data")
    os.close(fd)
    st = (rootfs / "etc" / "new").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (BASE + 33, BASE + 34, 0o640)
    info, _ = on_rootfs(rootfs, BASE, "mkdir", "/opt", uid=-1, gid=-1, mode=-1)
    st = (rootfs / "opt").stat()
    assert info.created and (st.st_uid, stat.S_IMODE(st.st_mode)) == (BASE, 0o750)
    info, _ = on_rootfs(rootfs, BASE, "symlink", "/opt/link", target="/etc/new")
    assert os.readlink(rootfs / "opt" / "link") == "/etc/new" and os.lstat(rootfs / "opt" / "link").st_uid == BASE
    with pytest.raises(FileFailed):
        on_rootfs(rootfs, BASE, "write", "/tmp/big-id", uid=70_000, gid=0, mode=-1)
    assert not (rootfs / "tmp" / "big-id").exists()


@needs_root
def test_what_the_instance_does_not_own_is_refused(rootfs: Path) -> None:
    (rootfs / "etc" / "foreign").write_text("host's\n")
    os.chown(rootfs / "etc" / "foreign", 0, 0)  # host root: not an id of the instance
    for op, args in (("open", {}), ("write", {"uid": -1, "gid": -1, "mode": -1}), ("delete", {})):
        with pytest.raises(FileFailed) as err:
            on_rootfs(rootfs, BASE, op, "/etc/foreign", **args)
        assert err.value.status == 403
    assert (rootfs / "etc" / "foreign").read_text() == "host's\n"


@needs_root
def test_existing_files_keep_owner_and_mode(rootfs: Path) -> None:
    os.chmod(rootfs / "etc" / "hostname", 0o600)
    info, fd = on_rootfs(rootfs, BASE, "write", "/etc/hostname", uid=5, gid=5, mode=0o777)
    assert fd is not None and not info.created
    os.write(fd, b"renamed\n")
    os.close(fd)
    st = (rootfs / "etc" / "hostname").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (BASE, 0o600)
    assert (rootfs / "etc" / "hostname").read_text() == "renamed\n"
    _, fd = on_rootfs(rootfs, BASE, "write", "/etc/hostname", uid=-1, gid=-1, mode=-1, append=True)
    os.write(fd, b"more\n")
    os.close(fd)
    assert (rootfs / "etc" / "hostname").read_text() == "renamed\nmore\n"


def test_fifos_are_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    before = fd_count()
    for op, args in (("open", {}), ("write", {"uid": -1, "gid": -1, "mode": -1})):
        with pytest.raises(FileFailed):
            on_rootfs(tmp_path, None, op, "/fifo", **args)  # would block a reader forever
    assert fd_count() == before


def _answer(**fields: object) -> bytes:
    base = {"type": "file", "uid": 0, "gid": 0, "mode": 0o644, "mtime": 0, "size": 0}
    return json.dumps({**base, **fields}).encode()


def test_answers_with_the_wrong_kind_of_fd_are_refused() -> None:
    before = fd_count()
    r, w = os.pipe()
    with pytest.raises(Forbidden):
        _take(_answer(fds=["file"]), [r])  # a pipe said to be a regular file: a reader would hang on it
    os.close(w)
    r, w = os.pipe()
    with pytest.raises(ApiError):
        _take(_answer(type="symlink", fds=["file"]), [r])  # a symlink comes with no fd
    os.close(w)
    assert fd_count() == before


@pytest.mark.parametrize("reply, n", [
    (b"not json", 1), (b"[]", 0), (_answer(fds=[]), 1), (_answer(type="socket"), 0), (_answer(uid="0"), 0),
    (_answer(fds=["file", "file"]), 2), (_answer(fds=["other"]), 1),
])
def test_malformed_answers_close_every_fd(reply: bytes, n: int) -> None:
    before = fd_count()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
    with pytest.raises(ApiError):
        _take(reply, fds)
    assert fd_count() == before


def test_errors_keep_their_meaning() -> None:
    with pytest.raises(Pid1Unavailable):
        _take(b"", [])
    with pytest.raises(FileFailed) as err:
        _take(json.dumps({"error": "No such file or directory: /x", "errno": 2}).encode(), [])
    assert (err.value.status, err.value.message) == (404, "No such file or directory: /x")
    with pytest.raises(FileFailed) as err:
        _take(json.dumps({"error": "Read-only file system: /proc/sys/x", "errno": 30}).encode(), [])
    assert err.value.status == 403
    with pytest.raises(BadRequest) as err2:
        _take(json.dumps({"error": "Invalid spawn request: 'argv'"}).encode(), [])
    assert "restart the instance" in err2.value.message


def test_empty_answers_close_their_fds() -> None:
    before = fd_count()
    with pytest.raises(Pid1Unavailable):
        _take(b"", [os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_RDONLY)])
    assert fd_count() == before


def test_only_stored_files_are_moved(tmp_path: Path) -> None:
    """A /proc or /sys file, or an unlinked one, is never written or read by the agent (its privileges
    would apply: /proc/N/oom_score_adj)."""
    for path in ("/proc/self/oom_score_adj", "/sys/kernel/mm/transparent_hugepage/enabled"):
        if not os.path.exists(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        with pytest.raises(Forbidden):
            _take(_answer(fds=["file"]), [fd])
    fd = os.memfd_create("payload")
    with pytest.raises(Forbidden):
        _take(_answer(fds=["file"]), [fd])
    real = tmp_path / "f"
    real.write_bytes(b"12345")
    info, fd = _take(_answer(size=999, fds=["file"]), [os.open(real, os.O_RDONLY)])
    assert fd is not None and info.size == 5  # the size the agent sees, not what pid1 said
    os.close(fd)


def test_pid1_id_range_is_the_runtimes() -> None:
    assert ID_RANGE == idranges.PER_INSTANCE


def test_failed_creates_close_their_directory(tmp_path: Path) -> None:
    """Found by tests/test_fuzz.py: a push whose create failed otherwise than EEXIST (here a name over
    NAME_MAX) left the parent directory's fd open, in pid1 (running) or in the agent (stopped)."""
    before = fd_count()
    for _ in range(5):
        with pytest.raises(FileFailed) as err:
            on_rootfs(tmp_path, None, "write", "/" + "a" * 300)
        assert err.value.status == 400 and "File name too long" in str(err.value)
    assert fd_count() == before
