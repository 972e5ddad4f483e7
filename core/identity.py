"""Who is calling: the requestor recorded on operations and checked on websocket connects (spec §5.1)."""

from __future__ import annotations

import functools
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    username: str
    protocol: str  # "unix", "tls", "cluster"
    address: str = "@"

    def same_requestor(self, other: Identity | None) -> bool:
        """Incus IsSameRequestor: username and protocol equal, address ignored."""
        return other is not None and (self.username, self.protocol) == (other.username, other.protocol)

    def to_json(self) -> dict[str, str]:
        return {"username": self.username, "protocol": self.protocol, "address": self.address}


@functools.lru_cache(maxsize=256)
def from_uid(uid: int) -> Identity:
    """Unix socket identity: the passwd name of the peer uid, or ``uid=<n>`` when unknown (spec §9.1)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid={uid}"
    return Identity(username=name, protocol="unix")
