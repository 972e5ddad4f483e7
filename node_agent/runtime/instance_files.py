"""Agent side of the file service (``pid1/files.py``). While an instance runs its pid1 does the request,
inside it; its answer is checked like any input from the instance (pid1 runs as the instance's root): it
is bounded and typed, and an fd that comes with it must be what the answer says it is (a regular file or a
directory, by ``fstat``), or it is closed and the request fails. While the instance is stopped the same
operations run here on its rootfs (``RootfsRoot``): every lookup by ``openat2`` with ``RESOLVE_IN_ROOT``,
ids translated through the instance's range, and nothing owned outside that range touched."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import posixpath
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import ApiError, BadRequest, Forbidden
from node_agent.runtime import idranges
from node_agent.runtime.inroot import open_in_root
from node_agent.runtime.pid1 import files
from node_agent.runtime.spawn import MAX_ERROR, Pid1Unavailable, ask

ID_COUNT = idranges.PER_INSTANCE  # ids an instance maps
OVERFLOW_ID = 65534  # what an unmapped id reads as inside (the kernel's overflowuid)
# Filesystems whose files are the instance's data (statfs(2) magic numbers): ext2/3/4, xfs, btrfs, overlay,
# tmpfs, zfs, f2fs, bcachefs, nfs, fuse is left out (a hung daemon would hang a worker thread).
STORED_FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x794C7630, 0x01021994, 0x2FC12FC1, 0xF2F52010,
                                0xCA451A4E, 0x6969})
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux
_libc = ctypes.CDLL(None, use_errno=True)
KINDS = {"file": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK}


@dataclass(frozen=True)
class FileInfo:
    """A path inside the instance, as the instance sees it (ids are the instance's own)."""

    type: str  # file | directory | symlink
    uid: int
    gid: int
    mode: int
    mtime_ns: int
    size: int
    target: str = ""  # of a symlink
    created: bool = False  # by this request


class FileFailed(ApiError):
    """What pid1 reported, with the errno it saw (HTTP status chosen from it)."""

    def __init__(self, message: str, code: int) -> None:
        status = 404 if code in (errno.ENOENT, errno.ENOTDIR) else 403 if code in (errno.EACCES, errno.EPERM,
                                                                                    errno.EROFS) else 400
        super().__init__(message, status)
        self.errno = code


async def request(socket_path: Path, op: str, path: str, **args: Any) -> tuple[FileInfo, int | None]:
    """``op`` on ``path`` inside the instance: what the path is now, and the opened file or directory
    for ``open`` and ``write`` (the caller's to close)."""
    payload = json.dumps({"file": op, "path": path, **args}).encode()
    reply, fds = await ask(socket_path, payload)
    return _take(reply, fds)


class RootfsRoot:
    """A stopped instance's rootfs as the file service's root (see pid1/files.ContainerRoot)."""

    def __init__(self, root_fd: int, id_base: int | None) -> None:
        self.fd = root_fd
        self.base = id_base  # None: ids are the host's (process driver, or not yet shifted)

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return open_in_root(self.fd, path, flags, mode if flags & os.O_CREAT else 0)  # openat2 is strict

    def parent(self, path: str) -> tuple[int, str]:
        head, name = posixpath.split(path)
        return open_in_root(self.fd, head or "/", os.O_PATH | os.O_DIRECTORY), name or "."

    def _mapped(self, host_id: int) -> bool:
        return self.base is None or self.base <= host_id < self.base + ID_COUNT

    def check(self, st: os.stat_result) -> None:
        if not (self._mapped(st.st_uid) and self._mapped(st.st_gid)):
            raise files.FileError("Permission denied: owned by an id outside the instance", errno.EACCES)

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        if self.base is None:
            return uid, gid
        if not (0 <= uid < ID_COUNT and 0 <= gid < ID_COUNT):
            raise files.FileError(f"Invalid ids {uid}:{gid}: the instance maps 0 to {ID_COUNT - 1}", errno.EINVAL)
        return self.base + uid, self.base + gid

    def instance_ids(self, st: os.stat_result) -> tuple[int, int]:
        if self.base is None:
            return st.st_uid, st.st_gid
        return tuple(i - self.base if self._mapped(i) else OVERFLOW_ID for i in (st.st_uid, st.st_gid))  # type: ignore[return-value]


def on_rootfs(rootfs: Path, id_base: int | None, op: str, path: str, **args: Any) -> tuple[FileInfo, int | None]:
    """``op`` on ``path`` of a stopped instance whose root filesystem is ``rootfs`` (blocking: run it on a
    worker thread)."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        answer, fd = files.handle({"file": op, "path": path, **args}, RootfsRoot(root_fd, id_base))
    except files.FileError as exc:
        raise FileFailed(str(exc), exc.code) from None
    except OSError as exc:
        raise FileFailed(f"{exc.strerror}: {path}", exc.errno or 0) from None
    finally:
        os.close(root_fd)
    return _answer({**answer, "fds": ["file"] if fd >= 0 else []}, [fd] if fd >= 0 else [])


def _take(reply: bytes, fds: list[int]) -> tuple[FileInfo, int | None]:
    if not reply:
        for fd in fds:
            os.close(fd)
        raise Pid1Unavailable()
    try:
        msg = json.loads(reply)
    except ValueError:
        msg = None
    return _answer(msg, fds)


def _answer(msg: Any, fds: list[int]) -> tuple[FileInfo, int | None]:
    """The answer's meaning and its fd; every fd that came with it is returned or closed."""
    try:
        return _checked(msg, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _checked(msg: Any, fds: list[int]) -> tuple[FileInfo, int | None]:
    if not isinstance(msg, dict):
        raise BadRequest("Malformed answer from the instance's pid1")
    if "error" in msg:
        code = msg.get("errno")
        text = str(msg["error"])[:MAX_ERROR]
        if text == "Invalid spawn request: 'argv'":  # a pid1 from before the file service
            raise BadRequest("This instance's pid1 predates the files API: restart the instance")
        raise FileFailed(text, code if isinstance(code, int) and not isinstance(code, bool) else 0)
    try:
        info = FileInfo(str(msg["type"]), _int(msg["uid"]), _int(msg["gid"]), _int(msg["mode"]),
                        _int(msg["mtime"]), _int(msg["size"]), str(msg.get("target", ""))[:4096],
                        msg.get("created") is True)
    except (KeyError, TypeError, ValueError):
        raise BadRequest("Malformed answer from the instance's pid1") from None
    if info.type not in KINDS or msg.get("fds", []) not in ([], ["file"]) or len(fds) != len(msg.get("fds", [])):
        raise BadRequest("Malformed answer from the instance's pid1")
    if not fds:
        return info, None
    fd = fds[0]
    st = os.fstat(fd)
    if info.type == "symlink" or stat.S_IFMT(st.st_mode) != KINDS[info.type]:
        raise Forbidden("The instance's pid1 answered with a file of another kind")
    if info.type == "file":
        _check_stored(fd, st)
        info = replace(info, size=st.st_size)  # the size the agent sees, not what pid1 said
    return info, fd


def _check_stored(fd: int, st: os.stat_result) -> None:
    """The agent moves the bytes as host root: only files stored on a filesystem of the instance's own
    (disk or tmpfs), linked in it. Never a /proc, /sys or cgroup file (the agent's privileges would apply
    to the write: /proc/N/oom_score_adj), never an unlinked one or a memfd."""
    kind = fs_type(fd)
    if kind not in STORED_FILESYSTEMS:
        raise Forbidden("Not a file stored in the instance (on /proc, /sys, a device or a special filesystem)")
    if st.st_nlink < 1:
        raise Forbidden("The file is not linked in the instance")


def fs_type(fd: int) -> int:
    """The filesystem magic of ``fd`` (fstatfs' f_type)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(value)
    return value
