"""Who is calling: the requestor recorded on operations and checked on websocket connects (spec §5.1),
and which projects it may see (a restricted TLS certificate sees only its own)."""

from __future__ import annotations

import functools
import json
import pwd
from dataclasses import dataclass
from typing import Any

# The header a member forwards a request with, on behalf of the identity it carries (JSON).
FORWARDED_HEADER = "X-Execbroker-Identity"


@dataclass(frozen=True)
class Identity:
    username: str  # unix: the passwd name; tls: the certificate's fingerprint (as Incus records it)
    protocol: str  # "unix", "tls", "cluster"
    address: str = "@"
    restricted: bool = False
    projects: tuple[str, ...] = ()  # the projects a restricted identity may use

    def same_requestor(self, other: Identity | None) -> bool:
        """Incus IsSameRequestor: username and protocol equal, address ignored."""
        return other is not None and (self.username, self.protocol) == (other.username, other.protocol)

    def allows(self, project: str) -> bool:
        return not self.restricted or project in self.projects

    def to_json(self) -> dict[str, str]:
        """The requestor as operations and lifecycle events show it."""
        return {"username": self.username, "protocol": self.protocol, "address": self.address}

    def to_wire(self) -> dict[str, Any]:
        """Everything, for a member forwarding a request on this identity's behalf."""
        return {**self.to_json(), "restricted": self.restricted, "projects": list(self.projects)}

    def header(self) -> dict[str, str]:
        """The forwarded-identity header (member-to-member requests only)."""
        return {FORWARDED_HEADER: json.dumps(self.to_wire(), separators=(",", ":"))}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Identity:
        return cls(str(d["username"]), str(d["protocol"]), str(d.get("address", "@")), bool(d.get("restricted")),
                   tuple(str(p) for p in d.get("projects") or ()))


@functools.lru_cache(maxsize=256)
def from_uid(uid: int) -> Identity:
    """Unix socket identity: the passwd name of the peer uid, or ``uid=<n>`` when unknown (spec §9.1)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid={uid}"
    return Identity(username=name, protocol="unix")
