"""Files of the instances of one node (``/1.0/instances/{name}/files``): pull, push, delete, with the
lookups done inside the instance by its pid1 (``runtime/instance_files``) and the bytes moved here,
between the HTTP body and the opened file, one bounded chunk at a time on a worker thread (a 2 GiB push
holds at most ``CHUNK`` bytes and never stalls the event loop on the disk)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.errors import ApiError, BadRequest
from core.filespec import MAX_SYMLINK_TARGET, PushSpec, response_headers
from core.identity import Identity
from node_agent.execs import Lifecycle
from node_agent.fdio import write_fully
from node_agent.metrics import Metrics
from node_agent.runtime.instance_files import FileInfo
from node_agent.runtime.instances import InstanceManager

CHUNK = 1 << 20
MAX_ENTRIES = 100_000  # of one directory listing
T = TypeVar("T")


class ThreadFd:
    """An open file whose blocking calls run on a worker thread. It is closed once, and never while a
    thread still uses it (a cancelled request leaves its thread running: the close waits for it, so the
    number is not reused under it), and never on the event loop (closing the last link of a big file
    frees its blocks)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._busy: asyncio.Future[Any] | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise ApiError("The file was closed", 500)
        self._busy = asyncio.get_running_loop().run_in_executor(None, fn, self.fd, *args)
        return await asyncio.shield(self._busy)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        busy = self._busy
        if busy is not None and not busy.done():
            busy.add_done_callback(lambda _f: self._close_now())
        else:
            self._close_now()

    def _close_now(self) -> None:
        asyncio.get_running_loop().run_in_executor(None, os.close, self.fd)


@dataclass
class Download:
    """What a GET answers: a file's bytes (``file``, ``size`` of them), a directory's entries, or a
    symlink's target; ``headers`` for both header families."""

    info: FileInfo
    headers: dict[str, str]
    entries: list[str] | None = None
    file: ThreadFd | None = None
    size: int = 0
    count: Callable[[int], None] = field(default=lambda _n: None, repr=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The content, in chunks of at most ``CHUNK`` bytes; the file is closed at the end (or on close)."""
        try:
            if self.file is None:
                if self.info.type == "symlink":
                    yield os.fsencode(self.info.target)
                return
            left = self.size
            while left > 0:
                data = await self.file.run(os.read, min(CHUNK, left))
                if not data:
                    raise ApiError("The file shrank while it was read", 500)
                left -= len(data)
                self.count(len(data))
                yield data
        finally:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Files:
    def __init__(self, instances: InstanceManager, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.instances = instances
        self._lifecycle = lifecycle
        self._pushed = metrics.file_bytes.labels("push").inc
        self._pulled = metrics.file_bytes.labels("pull").inc

    async def get(self, key: str, path: str, who: Identity, head: bool = False) -> Download:
        info, fd = await self.instances.file(key, "open", path)
        opened = ThreadFd(fd) if fd is not None else None
        try:
            headers = response_headers(info.type, info.uid, info.gid, info.mode, info.mtime_ns)
            if info.type == "directory":
                assert opened is not None
                entries = None if head else await opened.run(_list)
                download = Download(info, headers, entries=entries)
            elif info.type == "symlink":
                download = Download(info, headers, size=len(os.fsencode(info.target)))
            else:
                download = Download(info, headers, file=None if head else opened, size=info.size, count=self._pulled)
                if not head:
                    opened = None  # the download's now
        finally:
            if opened is not None:
                opened.close()
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
            opened = ThreadFd(fd)
            try:
                await _copy_in(body, opened, path, self._pushed)
            finally:
                opened.close()
        if spec.type == "file" or info.created:  # as LXD: an existing directory or same symlink is no event
            self._lifecycle("instance-file-pushed", key, who, {"path": path})

    async def delete(self, key: str, path: str, who: Identity) -> None:
        await self.instances.file(key, "delete", path)
        self._lifecycle("instance-file-deleted", key, who, {"path": path})


def _list(fd: int) -> list[str]:
    entries = []
    with os.scandir(fd) as it:
        for entry in it:
            if len(entries) == MAX_ENTRIES:
                raise BadRequest(f"The directory has more than {MAX_ENTRIES} entries")
            entries.append(entry.name)
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


async def _copy_in(body: AsyncIterator[bytes], fd: ThreadFd, path: str, count: Callable[[int], None]) -> None:
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


async def _write(fd: ThreadFd, data: bytearray, path: str) -> None:
    try:
        await fd.run(write_fully, data)
    except OSError as exc:
        raise ApiError(f"Failed to write {path}: {exc.strerror}", 500) from None
