"""Domain errors.

Raised anywhere inside execbroker and mapped to the Incus error envelope once, at the HTTP edge
(api/envelope.py). The message is the exact text a client sees in the envelope's ``error`` field.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status and the client-visible message."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    status = 400


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Unavailable(ApiError):
    status = 503


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 403: Forbidden, 404: NotFound, 409: Conflict}


def from_status(message: str, status: int) -> ApiError:
    """An error that came from another member as (status, message), as the class it was raised as
    there, so ``except NotFound`` holds across members. A 503 stays a plain ApiError: the member
    answered (busy), which is not the ``Unavailable`` of a member that cannot be reached."""
    return _BY_STATUS.get(status, ApiError)(message, status)


class SpawnError(Exception):
    """The command could not be started inside the instance (chdir, setuid, ...): op Failure, return -1."""
