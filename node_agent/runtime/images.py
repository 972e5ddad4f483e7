"""The images a node can create instances from, and their root filesystems.

* ``busybox``: the host's static busybox and a symlink per applet (built per instance in no time);
* ``debian``: Debian 12 minbase with apt and python3 (debian.py), built once per host on first use and kept
  in the image cache (``/var/cache/execbroker/images``, or ``$EXECBROKER_IMAGE_CACHE``), then copied per
  instance;
* ``host``: the host's ``/usr`` and ``/etc`` bind-mounted read-only into an empty skeleton.

An image's fingerprint is the SHA-256 of its recipe (what it is built from: the busybox binary, the mirror
sources and package list, the host's os-release), so every member with the same inputs names it alike,
before and after it is built.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.errors import BadRequest, NotFound
from node_agent.runtime import debian, rootfs

DEFAULT_CACHE = Path("/var/cache/execbroker/images")
NAMES = ("busybox", "debian", "host")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    alias: str
    description: str
    fingerprint: str
    properties: dict[str, str]
    size: int  # bytes on disk (0 for host, whose files are the host's)
    created_at: datetime | None  # when it was built; None until it is
    ready: bool  # built, ready to create instances from


def cache_dir() -> Path:
    return Path(os.environ.get("EXECBROKER_IMAGE_CACHE") or DEFAULT_CACHE)


class ImageStore:
    def __init__(self, cache: Path | None = None) -> None:
        self.cache = cache or cache_dir()
        self._lock = asyncio.Lock()  # one build at a time in this process (a file lock covers the host)
        self._sources: str | None = None
        self._fingerprints: dict[str, str] = {}

    # ------------------------------------------------------------------------------------ catalogue

    def list(self) -> list[Image]:
        return [self._describe(name) for name in NAMES]

    def get(self, ref: str) -> Image:
        """By alias, fingerprint, or a unique fingerprint prefix (as ``lxc`` accepts)."""
        if ref in NAMES:
            return self._describe(ref)
        matches = [img for img in self.list() if ref and img.fingerprint.startswith(ref)]
        if len(matches) != 1:
            raise NotFound("Image not found")
        return matches[0]

    def resolve(self, source: dict[str, object]) -> str:
        """The image an instance-create ``source`` names (alias or fingerprint; nothing: busybox)."""
        kind = source.get("type") or "image"
        if kind == "none":
            return "busybox"
        if kind != "image":
            raise BadRequest(f'Unsupported instance source "{kind}" (only images)')
        for field in ("alias", "fingerprint"):
            ref = source.get(field)
            if ref:
                if not isinstance(ref, str):
                    raise BadRequest(f"Invalid source {field}")
                try:
                    return self.get(ref).alias
                except NotFound:
                    raise BadRequest(f'Image "{ref}" not found (available: {", ".join(NAMES)})') from None
        return "busybox"

    def _describe(self, name: str) -> Image:
        if name == "busybox":
            binary = rootfs.BUSYBOX
            exists = binary.is_file()
            st = binary.stat() if exists else None
            return Image("busybox", "BusyBox (the host's busybox-static)", self._fingerprint(name),
                         {"os": "BusyBox", "variant": "static"}, st.st_size if st else 0,
                         datetime.fromtimestamp(st.st_mtime, timezone.utc) if st else None, exists)
        if name == "debian":
            built = self._built(self._fingerprint(name))
            return Image("debian", "Debian 12 (bookworm) minbase with apt and python3", self._fingerprint(name),
                         {"os": "Debian", "release": debian.SUITE, "version": "12", "variant": "minbase"},
                         int(built.get("size", 0)), _time(built.get("created_at")), bool(built))
        return Image("host", "The host's /usr and /etc, read-only", self._fingerprint(name),
                     {"os": "host", "variant": "read-only"}, 0, None, True)

    def _fingerprint(self, name: str) -> str:
        if name not in self._fingerprints:
            self._fingerprints[name] = self._recipe_hash(name)
        return self._fingerprints[name]

    def _recipe_hash(self, name: str) -> str:
        h = hashlib.sha256(f"execbroker image {name}\n".encode())
        if name == "busybox":
            try:
                h.update(rootfs.BUSYBOX.read_bytes())
            except OSError:
                pass
        elif name == "debian":
            h.update(" ".join((debian.SUITE, *debian.PACKAGES, *debian.DPKG_OPTIONS)).encode())
            h.update(self.sources().encode())
        else:
            try:
                h.update(Path("/etc/os-release").read_bytes())
            except OSError:
                pass
        return h.hexdigest()

    def sources(self) -> str:
        if self._sources is None:
            self._sources = debian.host_sources()
        return self._sources

    # --------------------------------------------------------------------------------------- builds

    def _template(self, fingerprint: str) -> Path:
        return self.cache / fingerprint / "rootfs"

    def _built(self, fingerprint: str) -> dict[str, object]:
        try:
            meta: dict[str, object] = json.loads((self.cache / fingerprint / "image.json").read_text())
            return meta
        except (OSError, ValueError):
            return {}

    async def prepare(self, name: str, progress: Progress) -> None:
        """Make sure ``name`` can populate a rootfs now: builds the debian image on first use."""
        if name != "debian" or self._describe(name).ready:
            return
        loop = asyncio.get_running_loop()

        def report(text: str) -> None:  # called in the build's thread; progress belongs to the loop
            loop.call_soon_threadsafe(progress, text)

        async with self._lock:
            await asyncio.to_thread(self._build_debian, report)

    def _build_debian(self, progress: Progress) -> None:
        fingerprint = self._fingerprint("debian")
        home = self.cache / fingerprint
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(self.cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another agent of this host may be building it right now
            if self._built(fingerprint):
                return
            progress("building Debian 12 with mmdebstrap")
            staging = Path(tempfile.mkdtemp(prefix=".build-", dir=self.cache))
            try:
                debian.build(staging / "rootfs", self.sources(), lambda stage: progress(f"mmdebstrap: {stage}"))
                _drop_device_nodes(staging / "rootfs" / "dev")  # runc makes /dev anew; none may be copied on
                size = _du(staging / "rootfs")
                meta = {"fingerprint": fingerprint, "size": size, "created_at": datetime.now(timezone.utc).isoformat()}
                (staging / "image.json").write_text(json.dumps(meta))
                shutil.rmtree(home, ignore_errors=True)
                os.rename(staging, home)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise

    def populate(self, name: str, dest: Path, hostname: str) -> None:
        """Create the rootfs of ``name`` at ``dest`` (must not exist). Blocking."""
        if name != "debian":
            rootfs.build_rootfs(name, dest, hostname)
            return
        template = self._template(self._fingerprint(name))
        if not self._built(self._fingerprint(name)):
            raise rootfs.RootfsError("The debian image is not built yet")
        done = subprocess.run(["cp", "-a", "--reflink=auto", str(template), str(dest)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(dest, ignore_errors=True)
            raise rootfs.RootfsError(f"Failed to copy the debian image: {done.stderr.strip()}")
        (dest / "etc" / "hostname").write_text(f"{hostname}\n")  # mmdebstrap copied the host's
        (dest / "etc" / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
                                            "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
        (dest / "etc" / "resolv.conf").unlink(missing_ok=True)  # the host's, and no network to use it on


def _drop_device_nodes(dev: Path) -> None:
    for dirpath, _dirs, files in os.walk(dev):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISCHR(os.lstat(path).st_mode) or stat.S_ISBLK(os.lstat(path).st_mode):
                os.unlink(path)


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _time(value: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
