"""The file service behind the files API: path lookups, creations and removals inside an instance.

The operations work against a ``Root``. While the instance runs they are done by its pid1, inside it, as
its root (``ContainerRoot``): the path resolves in the instance's own mount namespace (its `/run` tmpfs,
its read-only binds; an absolute or `..` symlink leads back into the instance) and the permission checks
are those of root in the instance's user namespace. While it is stopped the agent does them on the
rootfs (``runtime/instance_files.RootfsRoot``: every lookup by ``openat2`` with ``RESOLVE_IN_ROOT``,
ids translated through the instance's range). Either way only the opened file leaves this module; the
agent moves the bytes.

Request (pid1: the first and only message of a connection): ``{"file": OP, "path": "/abs", ...}``, OP one
of ``open`` (a regular file, directory or symlink; a symlink is not followed), ``write`` (``uid``,
``gid``, ``mode``, ``append``; a symlink is followed, inside), ``mkdir`` (``uid``, ``gid``, ``mode``),
``symlink`` (``target``), ``delete``. ``uid``/``gid``/``mode`` of -1: not given. As LXD: they apply to
what the request creates, never to what exists (a new file gets 0:0 0644, a new directory 0:0 0750).
Answer: ``{"type", "uid", "gid", "mode", "mtime", "size", "created"}`` (+ ``target`` for a symlink) with
``"fds": ["file"]`` and the fd for ``open`` (file or directory) and ``write``; or
``{"error": text, "errno": N}``.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import Any

MAX_PATH = 4096
NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o750
TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink"}


class FileError(Exception):
    def __init__(self, text: str, code: int = 0) -> None:
        super().__init__(text)
        self.code = code


class ContainerRoot:
    """pid1's own root: the kernel already resolves every path inside the instance; ids are as they are
    (``chown``: False for the unprivileged process driver, whose files stay the agent user's)."""

    def __init__(self, chown: bool = True, max_id: int = (1 << 32) - 2) -> None:
        self.chown = chown
        self.max_id = max_id  # the highest id the instance maps

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY, mode)

    def parent(self, path: str) -> tuple[int, str]:
        """An fd on the directory holding ``path`` (the caller closes it), and the last component."""
        head, name = posixpath.split(path)
        return os.open(head or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), name or "."

    def check(self, st: os.stat_result) -> None:
        """Refuse what the instance could not reach (nothing, here: the kernel decided already)."""

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        if not (uid <= self.max_id and gid <= self.max_id):
            raise FileError(f"Invalid ids {uid}:{gid}: the instance maps 0 to {self.max_id}", errno.EINVAL)
        return (uid, gid) if self.chown else (-1, -1)

    def instance_ids(self, st: os.stat_result) -> tuple[int, int]:
        return st.st_uid, st.st_gid


def handle(req: dict[str, Any], root: Any) -> tuple[dict[str, Any], int]:
    """Do one file request against ``root``: (answer, fd or -1). Raises FileError or OSError."""
    op, path = req.get("file"), req.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > MAX_PATH:
        raise FileError("Invalid path")
    path = posixpath.normpath(path)
    path = "/" + path.lstrip("/")  # normpath keeps a leading "//"
    uid, gid, mode = _ids(req)
    if op == "open":
        return _open(root, path)
    if op == "write":
        return _write(root, path, uid, gid, mode, bool(req.get("append")))
    if op == "mkdir":
        return _mkdir(root, path, uid, gid, mode), -1
    if op == "symlink":
        target = req.get("target")
        if not isinstance(target, str) or not target or "\0" in target or len(target) > MAX_PATH:
            raise FileError("Invalid symlink target")
        return _symlink(root, path, target), -1
    if op == "delete":
        return _delete(root, path), -1
    raise FileError(f"Unknown file operation {op!r}")


def describe(root: Any, st: os.stat_result, **extra: Any) -> dict[str, Any]:
    uid, gid = root.instance_ids(st)
    return {"type": TYPES.get(stat.S_IFMT(st.st_mode), "other"), "uid": uid, "gid": gid,
            "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime_ns, "size": st.st_size, **extra}


def _ids(req: dict[str, Any]) -> tuple[int, int, int]:
    values = []
    for key in ("uid", "gid", "mode"):
        value = req.get(key, -1)
        if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value < 1 << 32:
            raise FileError(f"Invalid {key}")
        values.append(value)
    if values[2] > 0o7777:
        raise FileError("Invalid mode")
    return values[0], values[1], values[2]


def _lstat(root: Any, path: str) -> tuple[os.stat_result, int, str]:
    """``path``'s own status (not followed), with its directory's fd (the caller closes it) and name."""
    dir_fd, name = root.parent(path)
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False), dir_fd, name
    except BaseException:
        os.close(dir_fd)
        raise


def _open(root: Any, path: str) -> tuple[dict[str, Any], int]:
    st, dir_fd, name = _lstat(root, path)
    try:
        root.check(st)
        kind = TYPES.get(stat.S_IFMT(st.st_mode))
        if kind == "symlink":  # answered with where it points, made absolute (as LXD)
            target = os.readlink(name, dir_fd=dir_fd)
            return describe(root, st, target=posixpath.normpath(posixpath.join(posixpath.dirname(path), target))), -1
        if kind is None:
            raise FileError(f"{path} is not a regular file, directory or symlink", errno.EINVAL)
        flags = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
                 | (os.O_DIRECTORY if kind == "directory" else 0))
        fd = os.open(name, flags, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    after = os.fstat(fd)
    if stat.S_IFMT(after.st_mode) != stat.S_IFMT(st.st_mode) or after.st_ino != st.st_ino:
        os.close(fd)
        raise FileError("The path changed while it was opened", errno.EAGAIN)
    return describe(root, after), fd


def _write(root: Any, path: str, uid: int, gid: int, mode: int, append: bool) -> tuple[dict[str, Any], int]:
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    owner = root.host_ids(max(uid, 0), max(gid, 0))  # refused before anything is made
    dir_fd, name = root.parent(path)
    try:  # closed however the create fails (a name over NAME_MAX, EACCES, EROFS...): pid1 is long-lived
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            fd = -1
        if fd >= 0:
            try:
                os.fchown(fd, *owner)
                os.fchmod(fd, mode if mode >= 0 else NEW_FILE_MODE)
            except BaseException:
                os.close(fd)
                os.unlink(name, dir_fd=dir_fd)  # nothing half made is left behind
                raise
            return describe(root, os.fstat(fd), created=True), fd
    finally:
        os.close(dir_fd)
    # It exists (a symlink is followed, inside the instance): what it is is checked before it is opened
    # for writing, so no device or FIFO is ever opened, even by the host on a stopped instance's rootfs.
    probe = root.open(path, os.O_PATH)
    try:
        st = os.fstat(probe)
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{path} is not a regular file", errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
        root.check(st)
        fd = os.open(f"/proc/self/fd/{probe}", flags | (os.O_APPEND if append else 0))
    finally:
        os.close(probe)
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            raise FileError("The path changed while it was opened", errno.EAGAIN)
        if not append:
            os.ftruncate(fd, 0)
        return describe(root, os.fstat(fd), created=False), fd
    except BaseException:
        os.close(fd)
        raise


def _mkdir(root: Any, path: str, uid: int, gid: int, mode: int) -> dict[str, Any]:
    owner = root.host_ids(max(uid, 0), max(gid, 0))
    dir_fd, name = root.parent(path)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:  # whatever is there stays as it is (as LXD)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            return describe(root, st, created=False)
        os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode if mode >= 0 else NEW_DIR_MODE)
            return describe(root, os.fstat(fd), created=True)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _symlink(root: Any, path: str, target: str) -> dict[str, Any]:
    dir_fd, name = root.parent(path)
    try:
        try:
            os.symlink(target, name, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                raise
            if os.readlink(name, dir_fd=dir_fd) == target:
                return describe(root, st, target=target, created=False)
            os.unlink(name, dir_fd=dir_fd)  # a symlink pushed again with another target replaces it
            os.symlink(target, name, dir_fd=dir_fd)
        os.chown(name, *root.host_ids(0, 0), dir_fd=dir_fd, follow_symlinks=False)
        return describe(root, os.stat(name, dir_fd=dir_fd, follow_symlinks=False), target=target, created=True)
    finally:
        os.close(dir_fd)


def _delete(root: Any, path: str) -> dict[str, Any]:
    st, dir_fd, name = _lstat(root, path)
    try:
        root.check(st)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
        return describe(root, st)
    finally:
        os.close(dir_fd)
