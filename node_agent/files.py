"""Files of the instances of one node (``/1.0/instances/{name}/files``): pull, push, delete, with the
lookups done inside the instance by its pid1 (``runtime/instance_files``) and the bytes moved here,
between the HTTP body and the opened file, one bounded chunk at a time on a worker thread (a 2 GiB push
holds at most ``CHUNK`` bytes and never stalls the event loop on the disk)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from core.errors import ApiError, BadRequest
from core.filespec import MAX_SYMLINK_TARGET, PushSpec, response_headers
from core.identity import Identity
from node_agent.execs import Lifecycle
from node_agent.fdio import close_quietly
from node_agent.metrics import Metrics
from node_agent.runtime.instance_files import FileInfo
from node_agent.runtime.instances import InstanceManager

CHUNK = 1 << 20
MAX_ENTRIES = 100_000  # of one directory listing


@dataclass
class Download:
    """What a GET answers: a file's bytes (``fd``, ``size`` of them), a directory's entries, or a
    symlink's target; ``headers`` for both header families."""

    info: FileInfo
    headers: dict[str, str]
    entries: list[str] | None = None
    fd: int | None = None
    size: int = 0
    count: Callable[[int], None] = field(default=lambda _n: None, repr=False)
    _closed: bool = field(default=False, repr=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The content, in chunks of at most ``CHUNK`` bytes; the file is closed at the end (or on close)."""
        try:
            if self.fd is None:
                if self.info.type == "symlink":
                    yield os.fsencode(self.info.target)
                return
            left = self.size
            while left > 0:
                data = await asyncio.to_thread(os.read, self.fd, min(CHUNK, left))
                if not data:
                    raise ApiError("The file shrank while it was read", 500)
                left -= len(data)
                self.count(len(data))
                yield data
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed and self.fd is not None:
            os.close(self.fd)
        self._closed = True


class Files:
    def __init__(self, instances: InstanceManager, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.instances = instances
        self._lifecycle = lifecycle
        self._pushed = metrics.file_bytes.labels("push").inc
        self._pulled = metrics.file_bytes.labels("pull").inc

    async def get(self, key: str, path: str, who: Identity, head: bool = False) -> Download:
        info, fd = await self.instances.file(key, "open", path)
        headers = response_headers(info.type, info.uid, info.gid, info.mode, info.mtime_ns)
        try:
            if info.type == "directory":
                assert fd is not None
                entries = None if head else await asyncio.to_thread(_list, fd)
                close_quietly(fd)
                fd = None
                download = Download(info, headers, entries=entries)
            elif info.type == "symlink":
                download = Download(info, headers, size=len(os.fsencode(info.target)))
            else:
                download = Download(info, headers, fd=None if head else fd, size=info.size, count=self._pulled)
                if head:
                    close_quietly(fd)
                fd = None
        finally:
            close_quietly(fd)
        if not head:
            self._lifecycle("instance-file-retrieved", key, who, {"path": path})
        return download

    async def push(self, key: str, path: str, spec: PushSpec, body: AsyncIterator[bytes], who: Identity) -> None:
        ids = {"uid": spec.uid, "gid": spec.gid}
        if spec.type == "directory":
            info, _ = await self.instances.file(key, "mkdir", path, mode=spec.mode, **ids)
        elif spec.type == "symlink":
            target = await _read_bounded(body, MAX_SYMLINK_TARGET)
            info, _ = await self.instances.file(key, "symlink", path, target=os.fsdecode(target))
        else:
            info, fd = await self.instances.file(key, "write", path, mode=spec.mode,
                                                 append=spec.write == "append", **ids)
            assert fd is not None
            try:
                await _copy_in(body, fd, path, self._pushed)
            finally:
                os.close(fd)
        if spec.type == "file" or info.created:  # as LXD: an existing directory or same symlink is no event
            self._lifecycle("instance-file-pushed", key, who, {"path": path})

    async def delete(self, key: str, path: str, who: Identity) -> None:
        await self.instances.file(key, "delete", path)
        self._lifecycle("instance-file-deleted", key, who, {"path": path})


def _list(fd: int) -> list[str]:
    entries = os.listdir(fd)
    if len(entries) > MAX_ENTRIES:
        raise BadRequest(f"The directory has more than {MAX_ENTRIES} entries")
    return sorted(entries)


async def _read_bounded(body: AsyncIterator[bytes], limit: int) -> bytes:
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > limit:
            raise BadRequest(f"Symlink target too long (limit {limit} bytes)")
    if not data or b"\0" in data:
        raise BadRequest("Invalid symlink target")
    return bytes(data)


async def _copy_in(body: AsyncIterator[bytes], fd: int, path: str, count: Callable[[int], None]) -> None:
    pending = bytearray()
    async for chunk in body:
        pending += chunk
        if len(pending) >= CHUNK:
            await _write(fd, pending, path)
            count(len(pending))
            pending = bytearray()
    if pending:
        await _write(fd, pending, path)
        count(len(pending))


async def _write(fd: int, data: bytearray, path: str) -> None:
    try:
        await asyncio.to_thread(_write_all, fd, data)
    except OSError as exc:
        raise ApiError(f"Failed to write {path}: {exc.strerror}", 500) from None


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
