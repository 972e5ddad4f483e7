"""The events websocket ``/1.0/events`` (spec §7) on an exec-style connection (api/wsconn.py): the listener
is registered before the 101 goes out (no event after it is missed), and its frames go out as they are
published, on callbacks, with no task per listener. While the client does not read, frames wait in the
listener's bounded queue; a listener the hub drops for being too slow (core/events.py) closes its socket
at once with ``DROP_CODE`` and the reason."""

from __future__ import annotations

from collections.abc import Callable

from api.wsconn import WebSocketConnection
from core.events import DROP_CODE, Listener


class EventStream:
    def __init__(self, listener: Listener, conn: WebSocketConnection,
                 unsubscribe: Callable[[Listener], None]) -> None:
        self.listener = listener
        self.conn = conn
        self._unsubscribe = unsubscribe
        self._waiting = False  # for the connection to drain
        self._ended = False
        listener.on_ready = self._pump
        listener.on_drop = self._dropped
        conn.listen(self._from_client)
        self._pump()

    def _pump(self) -> None:
        if self._waiting or self._ended:
            return
        while (frame := self.listener.take()) is not None:
            if not self.conn.offer(frame):
                self._waiting = True
                self.conn.when_drained(self._drained)
                return
        if self.listener.closed:
            self._end()

    def _dropped(self, reason: str) -> None:
        """Too slow: the close frame goes after what the transport holds, then the connection closes (no
        wait for a close frame from a client that reads nothing)."""
        self.conn.revoke(reason, DROP_CODE)

    def _drained(self) -> None:
        self._waiting = False
        self._pump()

    def _from_client(self, msg: bytes | str | None) -> None:
        if msg is None:  # the client went away: whatever it sends before that is ignored
            self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.listener.on_ready = None
        self._unsubscribe(self.listener)
        if self.listener.dropped:
            self.conn.revoke(self.listener.reason, DROP_CODE)
        else:
            self.conn.shut()
