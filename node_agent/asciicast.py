"""Session recording (extension ``exec_recording``): an exec's terminal as an asciicast v2 file, as
``asciinema play`` replays it. Line one is the header (size, start time, command, TERM); then one JSON
array per event, ``[seconds since the start, "o" | "i" | "r", text]``: output, input (only when asked for)
and resizes (``"WxH"``). Text is decoded as UTF-8 across chunk boundaries (invalid bytes replaced).
Bounded: past ``MAX_BYTES`` nothing more is written, and a last output event says so."""

from __future__ import annotations

import codecs
import json
import os
import shlex
import time
from collections.abc import Sequence

from node_agent.fdio import write_fully

MAX_BYTES = 256 << 20
TRUNCATED = "\r\n[execbroker: recording stopped at its size limit]\r\n"


class Recorder:
    def __init__(self, fd: int, width: int, height: int, command: Sequence[str], term: str,
                 with_input: bool) -> None:
        self._fd = fd
        self._with_input = with_input
        self._start = time.monotonic()
        self._written = 0
        self._full = False
        self._out = codecs.getincrementaldecoder("utf-8")("replace")
        self._in = codecs.getincrementaldecoder("utf-8")("replace")
        header = {"version": 2, "width": width or 80, "height": height or 24, "timestamp": int(time.time()),
                  "command": shlex.join(command), "env": {"TERM": term} if term else {}}
        self._line(json.dumps(header))

    def output(self, data: bytes) -> None:
        self._event("o", self._out.decode(data))

    def input(self, data: bytes) -> None:
        if self._with_input:
            self._event("i", self._in.decode(data))

    def resize(self, width: int, height: int) -> None:
        self._event("r", f"{width}x{height}")

    def close(self) -> None:
        if self._fd >= 0:
            self._event("o", self._out.decode(b"", final=True))
            os.close(self._fd)
            self._fd = -1

    def _event(self, kind: str, text: str) -> None:
        if text and not self._full:
            self._line(json.dumps([round(time.monotonic() - self._start, 6), kind, text]))

    def _line(self, line: str) -> None:
        data = (line + "\n").encode()
        if self._written + len(data) > MAX_BYTES:
            self._full = True
            data = (json.dumps([round(time.monotonic() - self._start, 6), "o", TRUNCATED]) + "\n").encode()
        try:
            write_fully(self._fd, data)
            self._written += len(data)
        except OSError:
            self._full = True  # disk full or the like: the session goes on unrecorded
