"""Root filesystems of instances: which images exist, how to build one, what pid1 bind-mounts into it.

* ``busybox``: a tiny complete userland from Debian's busybox-static (``/bin/busybox``, a static binary, so
  nothing else is needed inside): the binary, a symlink per applet, minimal /etc.
* ``host``: empty directories plus merged-usr symlinks; at start pid1 bind-mounts the host's /usr and /etc
  read-only over them, for richer tools than busybox has.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Image = Literal["busybox", "host"]
IMAGES: tuple[Image, ...] = ("busybox", "host")
BUSYBOX = Path("/bin/busybox")
BASE_DIRS = ("root", "tmp", "proc", "dev", "sys", "run", "var", "home")
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class RootfsError(Exception):
    """The image cannot be built on this machine (e.g. busybox-static is missing)."""


@dataclass(frozen=True)
class Bind:
    source: str  # host path
    target: str  # path inside the instance
    readonly: bool = True


def image_binds(image: str) -> list[Bind]:
    """Host directories pid1 bind-mounts into the rootfs of ``image`` at start."""
    if image == "host":
        return [Bind("/usr", "/usr"), Bind("/etc", "/etc")]
    return []


def build_rootfs(image: str, dest: Path, hostname: str) -> None:
    """Create the rootfs of ``image`` at ``dest`` (which must not exist yet)."""
    if image not in IMAGES:
        raise ValueError(f"Unknown image {image!r}")
    dest.mkdir(parents=True)
    for name in BASE_DIRS:
        (dest / name).mkdir()
    (dest / "root").chmod(0o700)
    (dest / "tmp").chmod(0o1777)
    if image == "busybox":
        _build_busybox(dest, hostname)
    else:
        _build_host(dest)


def _build_busybox(dest: Path, hostname: str) -> None:
    applets = busybox_applets()
    (dest / "bin").mkdir()
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in applets:
        link = dest / applet
        if link.name == "busybox" or os.path.lexists(link):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(dest / "bin" / "busybox", link.parent))
    etc = dest / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "hostname").write_text(f"{hostname}\n")


def _build_host(dest: Path) -> None:
    for bind in image_binds("host"):
        (dest / bind.target.lstrip("/")).mkdir()
    for name in MERGED_USR:  # mirror the host's merged-usr links (bin -> usr/bin, ...)
        host = Path("/") / name
        if host.is_symlink():
            (dest / name).symlink_to(os.readlink(host))


@functools.cache
def busybox_applets() -> tuple[str, ...]:
    """Applet paths relative to / (``bin/sh``, ``usr/bin/awk``, ...) of the host's static busybox."""
    if not BUSYBOX.is_file():
        raise RootfsError(f"{BUSYBOX} not found: install Debian's busybox-static")
    if _is_dynamic(BUSYBOX):
        raise RootfsError(f"{BUSYBOX} is dynamically linked: install Debian's busybox-static")
    out = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout
    return tuple(line.strip().lstrip("/") for line in out.splitlines() if line.strip())


def _is_dynamic(path: Path) -> bool:
    """True if the ELF file has a PT_INTERP program header (needs a dynamic loader)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # only 64-bit little-endian matters here
            return True
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def path_in_rootfs(rootfs: Path, image: str, path: str) -> Path:
    """Where ``path`` (absolute, inside the instance) is on the host while the instance is stopped."""
    inside = "/" + path.lstrip("/")
    for bind in image_binds(image):
        if inside == bind.target or inside.startswith(bind.target + "/"):
            return Path(bind.source + inside[len(bind.target):])
    return rootfs / inside.lstrip("/")
