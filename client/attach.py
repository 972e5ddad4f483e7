"""``execbroker attach``: rejoin a detachable exec (extension ``exec_detach``).

Output resumes where this client stopped (the offsets it saved when it last detached, in
``~/.local/state/execbroker/attach/<operation>.json``), from the oldest byte still held with
``--from-start``, else from now. Ctrl-C detaches a non-interactive session; in an interactive one (the
terminal is raw, Ctrl-C goes to the command) Ctrl-P Ctrl-Q detaches, as in docker. Detaching saves the
offsets; the command runs on. When the command ends, its exit code is this command's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from client import terminal
from client.api import Client, ClientError

DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q


def state_file(op_id: str) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "execbroker" / "attach" / f"{op_id}.json"


def saved_offsets(op_id: str) -> dict[str, int]:
    try:
        data = json.loads(state_file(op_id).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def save_offsets(op_id: str, offsets: dict[str, int]) -> None:
    path = state_file(op_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(offsets))
    tmp.replace(path)


def starting_offsets(streams: dict[str, dict[str, int]], saved: dict[str, int], from_start: bool) -> dict[str, int]:
    """Where each stream resumes; a saved offset already dropped from the server's buffer resumes at its
    earliest byte (the gap is reported)."""
    out = {}
    for name, st in streams.items():
        want = st["earliest"] if from_start else saved.get(name, st["produced"])
        out[name] = min(max(want, st["earliest"]), st["produced"])
    return out


class Attachment:
    def __init__(self, c: Client, op: dict[str, Any]) -> None:
        self.c = c
        self.op = op
        meta = op["metadata"]
        self.interactive = bool(meta["interactive"])
        self.fds: dict[str, str] = meta["fds"]
        self.detached = asyncio.Event()
        self.offsets: dict[str, int] = {}

    async def connect(self, fd: str, offset: int | None = None) -> Any:
        query = f"secret={quote(self.fds[fd])}" + (f"&offset={offset}" if offset is not None else "")
        return await self.c.websocket(f"/1.0/operations/{quote(self.op['id'])}/websocket?{query}")

    async def pump_out(self, ws: Any, stream: str, write: Any) -> None:
        with contextlib.suppress(Exception):  # the server closing is the end of it
            async for msg in ws:
                if isinstance(msg, str):
                    return
                write(msg)
                self.offsets[stream] += len(msg)

    async def pump_keys(self, ws: Any) -> None:
        """Interactive input; Ctrl-P Ctrl-Q detaches."""
        previous = b""
        async for chunk in terminal.read_chunks(0):
            both = previous + chunk
            if DETACH_KEYS in both:
                head = chunk[:max(0, chunk.find(b"\x11"))].rstrip(b"\x10")
                if head:
                    await ws.send(head)
                self.detached.set()
                return
            previous = chunk[-1:]
            if chunk.endswith(b"\x10"):
                chunk = chunk[:-1]  # held back: it may be the start of the detach keys
                if not chunk:
                    continue
            await ws.send(chunk)


async def cmd_attach(c: Client, args: Any) -> int:
    op = await c.get(f"/1.0/operations/{quote(args.operation, safe='')}")
    meta = op.get("metadata") or {}
    if not meta.get("detachable"):
        print("Error: not a detachable exec (start one with: execbroker exec --detach ...)", file=sys.stderr)
        return 1
    a = Attachment(c, op)
    streams = meta["detach"]["streams"]
    saved = saved_offsets(op["id"])
    a.offsets = starting_offsets(streams, saved, args.from_start)
    for name, start in a.offsets.items():
        want = saved.get(name, start) if not args.from_start else start
        if want < start:
            print(f"execbroker: {start - want} bytes of stream {name} were dropped from the buffer meanwhile",
                  file=sys.stderr)
    sockets = []
    loop = asyncio.get_running_loop()
    if not a.interactive:  # before any output shows: a Ctrl-C from then on detaches
        loop.add_signal_handler(signal.SIGINT, a.detached.set)
    try:
        if op.get("status") == "Running":  # after the end only the output is there to read
            with contextlib.suppress(ClientError):  # it may have ended meanwhile
                sockets.append(await a.connect("control"))
        tasks = []
        if a.interactive:
            ws = await a.connect("0", a.offsets["0"])
            sockets.append(ws)
            tasks.append(asyncio.ensure_future(a.pump_out(ws, "0", terminal.fd_writer(1))))
            keys = asyncio.ensure_future(a.pump_keys(ws))
        else:
            for name, fd in (("1", 1), ("2", 2)):
                ws = await a.connect(name, a.offsets[name])
                sockets.append(ws)
                tasks.append(asyncio.ensure_future(a.pump_out(ws, name, terminal.fd_writer(fd))))
            keys = None
        with contextlib.ExitStack() as stack:
            if a.interactive and os.isatty(0):
                stack.enter_context(terminal.raw_mode(0))
            done = asyncio.ensure_future(asyncio.gather(*tasks))
            detach = asyncio.ensure_future(a.detached.wait())
            await asyncio.wait({done, detach}, return_when=asyncio.FIRST_COMPLETED)
            for t in (detach, keys):
                if t is not None:
                    t.cancel()
        if a.detached.is_set() and not done.done():
            done.cancel()
            save_offsets(op["id"], a.offsets)
            print(f"\r\nDetached from {op['id']} (execbroker attach {op['id']} to come back)", file=sys.stderr)
            return 0
    finally:
        if not a.interactive:
            loop.remove_signal_handler(signal.SIGINT)
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()
    final = await c.wait_operation(op["id"])
    with contextlib.suppress(OSError):
        state_file(op["id"]).unlink()
    code = (final.get("metadata") or {}).get("return")
    if final.get("err"):
        print(f"Error: {final['err']}", file=sys.stderr)
    return int(code) if isinstance(code, int) else 1
