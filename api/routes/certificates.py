"""The trust store's routes: ``/1.0/certificates`` (list, add a certificate, ask for a token, or, for an
untrusted client, present a token) and ``/1.0/certificates/{fingerprint}`` (a unique prefix will do)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from api.connection import Peer
from api.request import identity, json_body, recursion, trusted
from broker.frontend import Frontend


def register(app: FastAPI, backend: Frontend) -> None:
    admin = backend.admin
    assert admin is not None

    @app.get("/1.0/certificates")
    async def certificates(request: Request) -> Response:
        identity(request)
        return envelope.sync(admin.list_certificates(recursion(request)))

    @app.post("/1.0/certificates")
    async def add_certificate(request: Request) -> Response:
        peer: Peer | None = getattr(request.state, "peer", None)
        token = await admin.add_certificate(identity(request) if trusted(request) else None,
                                            await json_body(request), peer.certificate if peer else None)
        if token is not None:
            return envelope.async_op(token)
        return envelope.sync()

    @app.get("/1.0/certificates/{fingerprint}")
    async def certificate(fingerprint: str, request: Request) -> Response:
        identity(request)
        return envelope.sync(admin.get_certificate(fingerprint))

    @app.put("/1.0/certificates/{fingerprint}")
    async def put_certificate(fingerprint: str, request: Request) -> Response:
        await admin.update_certificate(identity(request), fingerprint, await json_body(request), full=True)
        return envelope.sync()

    @app.patch("/1.0/certificates/{fingerprint}")
    async def patch_certificate(fingerprint: str, request: Request) -> Response:
        await admin.update_certificate(identity(request), fingerprint, await json_body(request), full=False)
        return envelope.sync()

    @app.delete("/1.0/certificates/{fingerprint}")
    async def delete_certificate(fingerprint: str, request: Request) -> Response:
        await admin.remove_certificate(identity(request), fingerprint)
        return envelope.sync()
