"""Where a new instance goes: the requested member, else the alive member with the fewest instances."""

from __future__ import annotations

from collections.abc import Mapping

from core.errors import NotFound, Unavailable


def choose_member(target: str | None, alive: Mapping[str, bool], counts: Mapping[str, int], me: str) -> str:
    """``alive``: every known member -> whether it is alive; ``counts``: instances per member (fresh)."""
    if target:
        if target not in alive:
            raise NotFound(f'Cluster member "{target}" not found')
        if not alive[target]:
            raise Unavailable(f"Cluster member {target} is offline")
        return target
    candidates = sorted(name for name, up in alive.items() if up)
    if not candidates:
        return me
    return min(candidates, key=lambda n: counts.get(n, 0))
