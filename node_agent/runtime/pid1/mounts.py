"""The instance's filesystems, set up by pid1 in its new mount namespace before it chroots: the
rootfs bound on itself, the image's read-only binds, /proc, a minimal /dev with its own devpts, /tmp."""

from __future__ import annotations

import os
from typing import Any

from node_agent.runtime.pid1.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
)

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def mount_filesystems(cfg: dict[str, Any]) -> None:
    root = cfg["rootfs"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate to the host
    mount(root, root, None, MS_BIND | MS_REC)
    for bind in cfg.get("binds", []):
        target = os.path.join(root, bind["target"].lstrip("/"))
        mount(bind["source"], target, None, MS_BIND | MS_REC)
        if bind.get("readonly"):
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = f"{root}/dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name in ("pts", "shm"):
        os.mkdir(f"{dev}/{name}", 0o755)
    mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for link, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{link}")
    mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

