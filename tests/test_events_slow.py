"""A slow events listener against the live broker: one that reads nothing is dropped with a close reason
once it is past its share (kernel buffers, then ``core.events.QUEUE_BYTES``), while the broker keeps
serving and its other listeners keep receiving everything."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, unix_connect
from websockets.uri import parse_uri

from core.events import DROP_CODE, QUEUE_BYTES
from tests.conftest import Broker, wait_for

pytestmark = pytest.mark.broker

ARG = 100_000  # bytes of one argument (the kernel takes at most 128 KiB per string)
ARGS = 9  # arguments per command: its instance-exec event is ~900 kB, within the 1 MiB request bound
# What a listener that reads nothing can be sent before the server sees it is behind: the socket's
# send buffer (4 MiB asked, doubled by Linux), one frame in the transport; then its queue's share.
BEHIND = 2 * (4 << 20) + (1 << 20) + QUEUE_BYTES
EXECS = 2 * BEHIND // (ARG * ARGS) + 1  # twice that, so nothing depends on the exact accounting


class Stalled:
    """An events websocket that, after its handshake, reads nothing until told to."""

    def __init__(self, path: Path, url: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.proto = ClientProtocol(parse_uri(url), max_size=None)
        self.proto.send_request(self.proto.connect())
        self.sock.sendall(b"".join(self.proto.data_to_send()))
        while self.proto.handshake_exc is None and not self.proto.events_received():
            self.proto.receive_data(self.sock.recv(65536))
        assert self.proto.handshake_exc is None, self.proto.handshake_exc

    def read_to_end(self, timeout: float) -> list[str]:
        """Everything the server sent, until it closed the connection: the text frames."""
        texts: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"the server did not close the stalled listener in {timeout}s "
                                     f"({len(texts)} events read)") from None
            if data:
                self.proto.receive_data(data)
            else:
                self.proto.receive_eof()
            texts += [bytes(f.data).decode() for f in self.proto.events_received()
                      if isinstance(f, Frame) and f.opcode == Opcode.TEXT]
            if not data:
                return texts

    def close(self) -> None:
        self.sock.close()


class Reader(threading.Thread):
    """An events listener that keeps up: every instance-exec event's marker (the command's 2nd word)."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.markers: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                marker = _marker(self.ws.recv())
                if marker:
                    self.markers.append(marker)
        except ConnectionClosed:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self.ws.close()
        self.join(10)


def _marker(frame: str | bytes) -> str:
    meta = json.loads(frame)["metadata"]
    command = meta.get("context", {}).get("command") or []
    return str(command[1]) if meta.get("action") == "instance-exec" and len(command) > 1 else ""


def _exec(broker: Broker, body: dict[str, Any]) -> dict[str, Any]:
    with broker.http() as c:
        r = c.post("/1.0/instances/c1/exec", content=json.dumps(body))
    assert r.status_code == 202, r.text
    return r.json()["metadata"]


def test_a_listener_that_reads_nothing_is_dropped_with_a_reason(broker: Broker, c1: str) -> None:
    tag = uuid.uuid4().hex[:8]
    url = "ws://eb/1.0/events?type=lifecycle"
    stalled = Stalled(broker.socket, url)
    with unix_connect(str(broker.socket), url, max_size=None, compression=None) as ws:
        fast = Reader(ws)
        try:
            fast.start()
            big = ["a" * ARG] * ARGS
            markers = [f"{tag}-{i}" for i in range(EXECS)]
            for m in markers:
                op = _exec(broker, {"command": ["true", m, *big], "wait-for-websocket": False})
                assert broker.wait_op(f"/1.0/operations/{op['id']}")["metadata"]["return"] == 0
            # every event was published to both listeners once the one that keeps up has them all
            wait_for(lambda: fast.error or len([m for m in fast.markers if m.startswith(tag)]) == EXECS, 120,
                     "the reading listener to get every event")
            assert fast.error is None, fast.error
            assert [m for m in fast.markers if m.startswith(tag)] == markers

            got = stalled.read_to_end(timeout=25)  # within the server's close grace (api/connection.CLOSE_GRACE)
            close = stalled.proto.close_rcvd
            assert close is not None, f"no close frame after {len(got)} events"
            assert close.code == DROP_CODE
            assert close.reason.startswith("events listener too slow: ") and "bytes queued" in close.reason, close
            seen = [m for m in map(_marker, got) if m.startswith(tag)]
            assert seen == markers[:len(seen)] and len(seen) < EXECS  # what it got, in order, then cut off

            # the broker serves on, and its other listener still gets new events
            assert broker.api("GET", "/1.0", status=200)["metadata"]["api_version"] == "1.0"
            op = _exec(broker, {"command": ["true", f"{tag}-after"], "wait-for-websocket": False})
            assert broker.wait_op(f"/1.0/operations/{op['id']}")["status"] == "Success"
            wait_for(lambda: f"{tag}-after" in fast.markers, 30, "the reading listener to get a later event")
        finally:
            stalled.close()
            fast.stop()
