"""4. Interactive keystroke echo round trip through the PTY.

Interactive exec of `cat`; send one byte, wait for its echo (the PTY's line discipline echoes it), many
times. Every LINE keystrokes a newline ends the line (canonical mode holds at most 4095 characters); that
round trip is not timed, and its output (echoed newline plus the line `cat` writes back) is read to the
exact byte count. Baseline: the same loop on a local PTY (pty.openpty + local `cat`), blocking IO.
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import time

from websockets.asyncio.client import ClientConnection

from bench.context import Context
from bench.harness import Row, summary_ms
from bench.wire import drain, start_exec

NAME = "keystroke"
TITLE = "4 keystroke echo (PTY)"
TARGET_OVER_MS = 2.0
LINE = 64
KEY = b"k"


def _line_output(n: int) -> int:
    """Bytes a newline after ``n`` echoed keys brings back: its echo "\\r\\n", then cat's line + "\\r\\n"."""
    return 2 + n + 2


async def _recv_exactly(ws: ClientConnection, n: int) -> None:
    got = 0
    while got < n:
        msg = await ws.recv()
        if isinstance(msg, str):
            raise RuntimeError("output ended early")
        got += len(msg)
    if got != n:
        raise RuntimeError(f"expected {n} bytes, got {got}")


async def broker_rounds(ctx: Context, n: int) -> list[float]:
    assert ctx.api is not None
    ex = await start_exec(ctx.api, "c1", ["cat"], interactive=True)
    ws = ex.ws["0"]
    times = []
    try:
        typed = 0
        while len(times) < n:
            t0 = time.perf_counter()
            await ws.send(KEY, text=False)
            await _recv_exactly(ws, 1)
            times.append(time.perf_counter() - t0)
            typed += 1
            if typed == LINE:
                await ws.send(b"\n", text=False)
                await _recv_exactly(ws, _line_output(typed))
                typed = 0
        await ws.send(b"\n\x04", text=False)  # end the line, then EOF: cat exits 0
        await asyncio.wait_for(drain(ws), 10)
        op = await ex.wait(30)
        ret = (op.get("metadata") or {}).get("return")
        if ret != 0:
            raise RuntimeError(f"interactive cat: return {ret} {op.get('err')}")
    finally:
        await ex.close()
    return times


def _read_exactly(fd: int, n: int) -> None:
    got = 0
    while got < n:
        select.select([fd], [], [], 5)
        got += len(os.read(fd, n - got))


def local_rounds(n: int) -> list[float]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(["cat"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    times = []
    try:
        typed = 0
        while len(times) < n:
            t0 = time.perf_counter()
            os.write(master, KEY)
            _read_exactly(master, 1)
            times.append(time.perf_counter() - t0)
            typed += 1
            if typed == LINE:
                os.write(master, b"\n")
                _read_exactly(master, _line_output(typed))
                typed = 0
        os.write(master, b"\n\x04")
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return times


async def run(ctx: Context) -> list[Row]:
    n = ctx.n(500, 3000)
    await broker_rounds(ctx, 50)  # warm up
    ours = summary_ms(await broker_rounds(ctx, n))
    local_rounds(50)
    base = summary_ms(local_rounds(n))
    over = ours["p50"] - base["p50"]
    return [
        Row(TITLE, "p50", ours["p50"], "ms", base["p50"], "local PTY + cat", ours["p50"] / base["p50"],
            f"<= baseline + {TARGET_OVER_MS:g} ms", over <= TARGET_OVER_MS, f"over baseline {over:.3f} ms; n={n}",
            extra={"ours": ours, "local": base}),
        Row(TITLE, "p99", ours["p99"], "ms", base["p99"], "local PTY + cat", ours["p99"] / base["p99"]),
    ]
