"""Shifting a root filesystem's ownership into an instance's id range (uid/gid ``n`` becomes
``base + n``), as LXD's "Remapping container filesystem" does for a runtime without idmapped mounts:
root inside the container then owns its files, and nothing in them is owned by a host id."""

from __future__ import annotations

import os
import stat
from pathlib import Path

RANGE = 65536


def shift(root: Path, base: int, old_base: int = 0) -> int:
    """Move every file under ``root`` from ids ``old_base + n`` to ``base + n`` (n < RANGE); ids outside
    the old range are left alone. Hard links are shifted once; set-id bits, which chown clears, are
    restored. Returns the number of inodes changed."""
    seen: set[tuple[int, int]] = set()
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, None]:
            path = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            uid, gid = _move(st.st_uid, old_base, base), _move(st.st_gid, old_base, base)
            if (uid, gid) == (st.st_uid, st.st_gid):
                continue
            os.lchown(path, uid, gid)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))
            changed += 1
    return changed


def _move(value: int, old_base: int, base: int) -> int:
    return base + (value - old_base) if old_base <= value < old_base + RANGE else value
