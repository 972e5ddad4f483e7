"""One command run to completion with its output captured, bounded (a fan-out's share on one instance):
stdin is /dev/null, the first ``limit`` bytes of stdout and stderr are kept and the rest read and
dropped (the command never blocks on a full pipe), the timeout applies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.execspec import ExecPost, ExitResult
from node_agent.deadline import Deadline, outcome
from node_agent.fdio import OutputReader, close_quietly, make_pipe, write_fully
from node_agent.runtime.spawn import Process, SpawnRequest


@dataclass
class Captured:
    result: ExitResult
    stdout: bytes
    stderr: bytes
    truncated: bool
    produced: int = 0  # bytes of stdout and stderr in all


async def _keep(reader: OutputReader, limit: int, file: int | None) -> tuple[bytes, int]:
    """The first ``limit`` bytes, and how many there were in all."""
    kept = bytearray()
    total = 0
    while data := await reader.read():
        total += len(data)
        kept += data[:max(limit - len(kept), 0)]
        if file is not None:
            file = _tee(file, data)
    return bytes(kept), total


def _tee(fd: int, data: bytes) -> int | None:
    """``data`` into the record-output file; None from the first failed write on (a full disk)."""
    try:
        write_fully(fd, data)
        return fd
    except OSError:
        return None


async def run(spawn: Callable[[SpawnRequest, tuple[int, ...]], Awaitable[Process]], post: ExecPost,
              env: dict[str, str], limit: int, files: tuple[int, int] | None = None) -> Captured:
    """``files``: where stdout and stderr also go, whole (record-output); the caller closes them."""
    out_r, out_w = make_pipe()
    err_r, err_w = make_pipe()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        req = SpawnRequest(argv=list(post.command), env=env, cwd=post.cwd or "", uid=post.user or 0,
                           gid=post.group or 0)
        try:
            process = await spawn(req, (devnull, out_w, err_w))
        finally:
            close_quietly(devnull, out_w, err_w)
        exited = asyncio.Event()
        tees = files or (None, None)
        readers = [asyncio.ensure_future(_keep(OutputReader(fd, exited), limit, tee))
                   for fd, tee in zip((out_r, err_r), tees)]
        deadline = Deadline(process, post.timeout) if post.timeout is not None else None
        try:
            try:
                code = await process.wait()
            finally:
                exited.set()
                if deadline is not None:
                    deadline.cancel()
            (out, out_total), (err, err_total) = await asyncio.gather(*readers)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if process.returncode is None:  # cancelled: nothing outlives its request
                process.kill_group()
            process.close()
    finally:
        close_quietly(out_r, err_r)
    produced = out_total + err_total
    return Captured(outcome(deadline, code), out, err, produced > len(out) + len(err), produced)
