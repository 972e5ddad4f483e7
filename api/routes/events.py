"""The events websocket ``/1.0/events`` (spec §7): a listener registered before the upgrade. A listener the
hub drops for being too slow (core/events.py) closes its socket at once, with the reason."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, WebSocket

from api import envelope
from api.connection import closer
from api.request import project_of
from broker.frontend import Frontend
from core.errors import ApiError
from core.events import DROP_CODE


def register(app: FastAPI, backend: Frontend) -> None:
    @app.websocket("/1.0/events")
    async def events(ws: WebSocket) -> None:
        try:
            project_name = project_of(ws, backend, allow_all=True)
            listener = backend.subscribe(ws.query_params.get("type"), project_name)
        except ApiError as exc:
            await ws.send_denial_response(envelope.from_exception(exc))
            return
        close_now = closer(ws.scope)
        if close_now is not None:  # the route may be waiting on a send that the client never reads
            listener.on_drop = lambda reason: close_now(DROP_CODE, reason)
        reader: asyncio.Future[None] | None = None
        try:  # the listener exists before the 101 goes out: no event after it is missed
            await ws.accept()
            reader = asyncio.ensure_future(_until_disconnect(ws))
            while True:
                nxt = asyncio.ensure_future(listener.next())
                await asyncio.wait({nxt, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    break
                frame = nxt.result()
                if frame is None:
                    break
                await ws.send_text(frame)
        except Exception:  # noqa: BLE001 - a broken events socket just ends the listener
            pass
        finally:
            backend.unsubscribe(listener)
            if reader is not None:
                reader.cancel()
            with contextlib.suppress(Exception):
                if listener.dropped:
                    await ws.close(DROP_CODE, listener.reason)
                else:
                    await ws.close()


async def _until_disconnect(ws: WebSocket) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass
