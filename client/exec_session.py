"""The client side of one exec (spec §5, §8.1): its websockets, stdin pumped in, outputs to sinks,
control messages (resize, signal), and the result once the operation ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from client.api import Client

STDIN_CHUNK = 1 << 20  # bytes stdin is sent in frames of this size
# After the operation has finished, outputs still in flight get this long to arrive before being cut off.
DRAIN_GRACE = 5.0

Sink = Callable[[bytes], object]
Stdin = AsyncIterable[bytes] | bytes | None


@dataclass(frozen=True)
class ExecResult:
    return_code: int | None  # metadata.return; None if the server never set it
    error: str  # operation ``err`` ("" on success), e.g. "Command not found"
    stdout_bytes: int = 0  # bytes received on stdout (the PTY stream when interactive)
    stderr_bytes: int = 0



async def open_sockets(opener: Callable[[str], Awaitable[ClientConnection]], url: str, fds: Mapping[str, str],
                       names: Sequence[str], into: dict[str, ClientConnection]) -> None:
    """Open the named exec sockets at once (``url`` + each one's secret). Those that opened are put in
    ``into`` even when another failed, so the caller can close them; the first failure is raised."""
    conns = await asyncio.gather(*(opener(url + fds[n]) for n in names), return_exceptions=True)
    for name, conn in zip(names, conns):
        if isinstance(conn, ClientConnection):
            into[name] = conn
    for conn in conns:
        if isinstance(conn, BaseException):
            raise conn


class ExecSession:
    """A running exec: control messages out, the result in. Always ``await wait()`` or ``aclose()``."""

    def __init__(self, client: Client, op_id: str, fds: Mapping[str, str], interactive: bool) -> None:
        self.client = client
        self.operation_id = op_id
        self.interactive = interactive
        self.recording = ""  # the asciicast file's URL, for a recorded session
        self._fds = fds
        self._ws: dict[str, ClientConnection] = {}
        self._counts = {"1": 0, "2": 0}
        self._stdin_task: asyncio.Task[None] | None = None
        self._output_tasks: list[asyncio.Task[None]] = []
        self._op_task: asyncio.Task[dict[str, Any]] | None = None

    async def _connect(self) -> None:
        # Control first (the server kills the command if control closes; connecting it first is what the Go CLI
        # does), then the data sockets concurrently: the command starts once the last required one is in.
        url = f"/1.0/operations/{self.operation_id}/websocket?secret="
        if "control" in self._fds:
            self._ws["control"] = await self.client.websocket(url + self._fds["control"])
        names = [k for k in ("0", "1", "2") if k in self._fds]
        await open_sockets(self.client.websocket, url, self._fds, names, self._ws)

    def _start(self, stdin: Stdin, stdout_sink: Sink | None, stderr_sink: Sink | None) -> None:
        # Interactive without stdin: send nothing. A PTY has no EOF, and LXD 5.0 hangs the PTY up (SIGHUP,
        # return 129) on the stdin barrier, where Incus only stops forwarding input.
        if stdin is not None or not self.interactive:
            self._stdin_task = asyncio.create_task(self._send_stdin(self._ws["0"], stdin))
        if self.interactive:
            outputs = [("0", "1", stdout_sink)]
        else:
            outputs = [("1", "1", stdout_sink), ("2", "2", stderr_sink)]
        self._output_tasks = [asyncio.create_task(self._receive(self._ws[n], c, s)) for n, c, s in outputs]
        # Wait server-side from the start: a finished operation is only kept for a few seconds.
        self._op_task = asyncio.create_task(self.client.wait_operation(self.operation_id))

    @staticmethod
    async def _send_stdin(ws: ClientConnection, stdin: Stdin) -> None:
        try:
            if isinstance(stdin, (bytes, bytearray, memoryview)):
                view = memoryview(stdin)
                for i in range(0, len(view), STDIN_CHUNK):
                    await ws.send(view[i:i + STDIN_CHUNK], text=False)
            elif stdin is not None:
                async for chunk in stdin:
                    if chunk:
                        await ws.send(chunk, text=False)
            await ws.send("")  # EOF barrier
        except ConnectionClosed:
            pass

    async def _receive(self, ws: ClientConnection, counter: str, sink: Sink | None) -> None:
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, str):  # barrier
                    return
                self._counts[counter] += len(message)
                if sink is not None:
                    sink(message)
        except ConnectionClosed:
            return

    @property
    def has_control(self) -> bool:
        """Whether resize/signal can reach the command (old servers have no control socket)."""
        return "control" in self._ws

    async def _send_control(self, message: Mapping[str, Any]) -> bool:
        ws = self._ws.get("control")
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:
            return False
        return True

    async def resize(self, width: int, height: int) -> bool:
        """Send ``window-resize`` (interactive only). False if there is no open control socket."""
        return await self._send_control(
            {"command": "window-resize", "args": {"width": str(width), "height": str(height)}})

    async def signal(self, signum: int) -> bool:
        """Forward a signal to the command. False if there is no open control socket."""
        return await self._send_control({"command": "signal", "signal": int(signum)})

    async def wait(self) -> ExecResult:
        """Wait for the outputs' barriers and the operation's end; closes every socket on the way out.

        Cancelling it (e.g. ``asyncio.wait_for``) tears the session down, which kills the command.
        """
        op_task = self._op_task
        assert op_task is not None
        try:
            outputs = asyncio.gather(*self._output_tasks)
            done, _ = await asyncio.wait({op_task, outputs}, return_when=asyncio.FIRST_COMPLETED)
            if outputs in done:
                await outputs
            else:  # the operation ended first: anything still to come is already in flight
                try:
                    await asyncio.wait_for(outputs, DRAIN_GRACE)
                except asyncio.TimeoutError:
                    pass
            # Outputs are done: stop sending stdin (the command may never read it) and drop socket 0. An
            # interactive server waits for a proper close of it before it finishes the operation.
            if self._stdin_task is not None:
                self._stdin_task.cancel()
            await self._close("0", handshake=self.interactive)
            op = await op_task
        finally:
            await self.aclose()
        metadata = op.get("metadata") or {}
        ret = metadata.get("return")
        return ExecResult(
            return_code=int(ret) if ret is not None else None,
            error=op.get("err") or "",
            stdout_bytes=self._counts["1"],
            stderr_bytes=self._counts["2"],
        )

    async def _close(self, name: str, handshake: bool = True) -> None:
        ws = self._ws.pop(name, None)
        if ws is None:
            return
        if handshake:
            await ws.close()
        else:  # a peer that is not reading (or still streaming) would make close() sit out its timeout
            ws.transport.abort()

    async def aclose(self) -> None:
        """Tear the session down. Closing control while the command runs makes the server kill it."""
        for task in [self._stdin_task, self._op_task, *self._output_tasks]:
            if task is not None:
                task.cancel()
        await self._close("control")
        for name in list(self._ws):
            await self._close(name, handshake=False)
