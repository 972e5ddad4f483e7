"""Opening paths inside an instance's root from the host, the way a process inside would resolve them:
``openat2`` with ``RESOLVE_IN_ROOT`` (Linux 5.6), so an absolute or ``..`` symlink that root inside the
instance planted leads back into the instance, never out to the host's files."""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """An fd on ``path`` resolved inside the directory ``root_fd`` (magic links refused too)."""
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2 is not known on this architecture")
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), os.fsencode(path.lstrip("/") or "."),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def exists_in_root(root: str, path: str) -> bool:
    """Whether ``path`` exists inside ``root`` (a directory, e.g. ``/proc/PID/root``), without following
    anything out of it."""
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.close(open_in_root(root_fd, path, os.O_PATH | os.O_NOFOLLOW))
        return True
    except OSError:
        return False
    finally:
        os.close(root_fd)
