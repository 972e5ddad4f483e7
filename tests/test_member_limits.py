"""A member's calls and event batches are bounded by limits of their own, not the clients' JSON body
limit (an event batch of a fan-out can be several MiB), and reading stops at the bound (no Ray)."""

from __future__ import annotations

import pytest


async def _body(chunks: list[bytes]):  # type: ignore[no-untyped-def]
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():  # type: ignore[no-untyped-def]
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "path": "/internal/v1/events", "headers": []}, receive)


async def test_member_batches_bounded_by_their_own_limit_not_the_clients() -> None:
    from api.limits import MAX_BODY, PayloadTooLarge
    from api.routes import internal

    assert internal.is_member_request({"path": "/internal/v1/events"})
    assert not internal.is_member_request({"path": "/1.0/instances"})
    big = b'{"batch": [], "pad": "' + b"x" * (2 * MAX_BODY) + b'"}'  # over the clients' 1 MiB: still taken
    assert (await internal._json(await _body([big[:MAX_BODY], big[MAX_BODY:]]), internal.EVENTS_BODY))["batch"] == []
    with pytest.raises(PayloadTooLarge):
        await internal._json(await _body([b"x" * 1024] * 5), 4096)  # stops reading at the bound
