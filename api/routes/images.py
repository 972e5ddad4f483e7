"""Image routes: ``/1.0/images`` and ``/1.0/images/aliases`` (what ``lxc launch`` and ``lxc image list``
read). The images are built in: the same on every member, so any member answers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from api import envelope
from api.request import recursion
from broker.frontend import Frontend
from core.errors import BadRequest

BUILT_IN = "The images are built in: they cannot be added, changed or deleted"


def register(app: FastAPI, backend: Frontend) -> None:
    images = backend.local

    @app.get("/1.0/images")
    async def list_images(request: Request) -> Response:
        return envelope.sync(images.list_images(recursion(request)))

    @app.get("/1.0/images/aliases")
    async def list_aliases(request: Request) -> Response:
        return envelope.sync(images.list_image_aliases(recursion(request)))

    @app.get("/1.0/images/aliases/{name}")
    async def get_alias(name: str) -> Response:
        return envelope.sync(images.get_image_alias(name))

    @app.get("/1.0/images/{fingerprint}")
    async def get_image(fingerprint: str) -> Response:
        return envelope.sync(images.get_image(fingerprint))

    @app.api_route("/1.0/images", methods=["POST"])
    @app.api_route("/1.0/images/aliases", methods=["POST"])
    @app.api_route("/1.0/images/aliases/{name}", methods=["PUT", "PATCH", "POST", "DELETE"])
    @app.api_route("/1.0/images/{fingerprint}", methods=["PUT", "PATCH", "DELETE"])
    async def change(request: Request) -> Response:
        raise BadRequest(BUILT_IN)
