"""Timestamps as the Go clients parse them: RFC 3339 with nanoseconds and an offset."""

from __future__ import annotations

from datetime import datetime, timezone


def now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(ts: datetime | None) -> str:
    """Render like Go's time.RFC3339Nano; a missing time renders as Go's zero time."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.isoformat()
