"""Shifting a root filesystem's ownership into an instance's id range (uid/gid ``n`` becomes
``base + n``), as LXD's "Remapping container filesystem" does for a runtime without idmapped mounts:
root inside the container then owns its files, and nothing in them is owned by a host id. File
capabilities (``security.capability``, which chown drops) come back as namespaced ones (revision 3,
rooted at the instance's root), so they hold inside the instance and nowhere else. POSIX ACLs are not
shifted."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

RANGE = 65536
CAPS = "security.capability"
REVISION_MASK, REVISION_2, REVISION_3 = 0xFF000000, 0x02000000, 0x03000000


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
            caps = _file_caps(path) if stat.S_ISREG(st.st_mode) else None
            os.lchown(path, uid, gid)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))
            if caps is not None:
                os.setxattr(path, CAPS, rooted_caps(caps, old_base, base), follow_symlinks=False)
            changed += 1
    return changed


def _move(value: int, old_base: int, base: int) -> int:
    return base + (value - old_base) if old_base <= value < old_base + RANGE else value


def _file_caps(path: str) -> bytes | None:
    try:
        return os.getxattr(path, CAPS, follow_symlinks=False)
    except OSError:
        return None


def rooted_caps(raw: bytes, old_base: int, base: int) -> bytes:
    """A ``security.capability`` value as revision 3, rooted at the instance's root (host uid ``base``)."""
    magic = struct.unpack_from("<I", raw)[0]
    if magic & REVISION_MASK == REVISION_2 and len(raw) == 20:
        return struct.pack("<I", REVISION_3 | (magic & ~REVISION_MASK)) + raw[4:20] + struct.pack("<I", base)
    if magic & REVISION_MASK == REVISION_3 and len(raw) == 24:
        return raw[:20] + struct.pack("<I", _move(struct.unpack_from("<I", raw, 20)[0], old_base, base))
    return raw
