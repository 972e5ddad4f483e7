"""The cluster-wide records as typed objects, and every change to them as one method that returns the
records to replicate. IO-free: the cluster-state actor runs these methods on the authoritative copy; a
member without a cluster runs them on its own."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from core import projects as proj
from core.errors import ApiError, BadRequest, Conflict, Forbidden, NotFound
from core.projects import Project
from core.replicated import Record, ReplicatedMap
from core.trust import MAX_TOKENS, Certificate, Token, find_token

# Cluster-wide server config keys and their checks (member-local keys live with the member).
TOKEN_EXPIRY = "core.remote_token_expiry"
MAX_CONNECTIONS = "execbroker.max_connections"
MAX_OPERATIONS = "execbroker.max_operations_per_client"
CLUSTER_KEYS = (TOKEN_EXPIRY, MAX_CONNECTIONS, MAX_OPERATIONS)
TOMBSTONE_GRACE = 86_400.0  # a consumed token's tombstone outlives it by a day (late merges stay refused)


class ServerRecords:
    def __init__(self, records: ReplicatedMap | None = None, origin: str = "") -> None:
        self.map = records if records is not None else ReplicatedMap()
        self.origin = origin

    # -- reads ----------------------------------------------------------------------------------------
    def certificates(self) -> list[Certificate]:
        return sorted((Certificate.from_value(fp, v) for fp, v in self.map.items("certificate").items()),
                      key=lambda c: (c.name, c.fingerprint))

    def certificate(self, fingerprint: str) -> Certificate | None:
        value = self.map.get("certificate", fingerprint)
        return None if value is None else Certificate.from_value(fingerprint, value)

    def find_certificate(self, prefix: str) -> Certificate:
        """By fingerprint or a unique prefix of it (``lxc config trust show 4d7f326f``)."""
        prefix = prefix.lower()
        matches = [c for c in self.certificates() if c.fingerprint.startswith(prefix)] if prefix else []
        if not matches:
            raise NotFound("Certificate not found")
        if len(matches) > 1:
            raise BadRequest("More than one certificate matches")
        return matches[0]

    def tokens(self) -> list[Token]:
        return sorted((Token.from_value(k, v) for k, v in self.map.items("token").items()),
                      key=lambda t: t.created_at)

    def token(self, token_id: str) -> Token | None:
        value = self.map.get("token", token_id)
        return None if value is None else Token.from_value(token_id, value)

    def projects(self) -> list[Project]:
        found = {n: Project.from_value(n, v) for n, v in self.map.items("project").items()}
        found.setdefault(proj.DEFAULT, proj.DEFAULT_PROJECT)
        return [found[n] for n in sorted(found)]

    def project(self, name: str) -> Project | None:
        if name == proj.DEFAULT:
            value = self.map.get("project", name)
            return proj.DEFAULT_PROJECT if value is None else Project.from_value(name, value)
        value = self.map.get("project", name)
        return None if value is None else Project.from_value(name, value)

    def config(self) -> dict[str, str]:
        return {k: str(v["value"]) for k, v in self.map.items("config").items()}

    def config_int(self, key: str, default: int) -> int:
        value = self.config().get(key)
        return int(value) if value else default

    # -- changes --------------------------------------------------------------------------------------
    def put(self, kind: Any, key: str, value: dict[str, Any] | None, expires_at: float = 0.0) -> list[Record]:
        return [self.map.put(kind, key, value, self.origin, expires_at)]

    def add_certificate(self, cert: Certificate) -> list[Record]:
        if self.certificate(cert.fingerprint) is not None:
            raise BadRequest("Client is already trusted")
        return self.put("certificate", cert.fingerprint, cert.to_value())

    def update_certificate(self, cert: Certificate) -> list[Record]:
        if self.certificate(cert.fingerprint) is None:
            raise NotFound("Certificate not found")
        return self.put("certificate", cert.fingerprint, cert.to_value())

    def remove_certificate(self, fingerprint: str) -> list[Record]:
        if self.certificate(fingerprint) is None:
            raise NotFound("Certificate not found")
        return [self.map.delete("certificate", fingerprint, self.origin)]

    def add_token(self, token: Token) -> list[Record]:
        if len(self.map.items("token")) >= MAX_TOKENS:
            raise ApiError(f"Too many pending trust tokens (limit {MAX_TOKENS}): revoke some first", 429)
        return self.put("token", token.id, token.to_value(), _expiry(token))

    def consume_token(self, secret_hash: str, now: datetime) -> tuple[Token, list[Record]]:
        """The token matching the client's secret, used up (works once); expired ones are dropped."""
        try:
            token = find_token(self.tokens(), secret_hash, now)
        except ApiError:
            self.expire_tokens(now)
            raise
        return token, [self.map.delete("token", token.id, self.origin)]

    def revoke_token(self, token_id: str) -> list[Record]:
        if self.token(token_id) is None:
            raise NotFound("Operation not found")
        return [self.map.delete("token", token_id, self.origin)]

    def expire_tokens(self, now: datetime) -> list[Record]:
        """Expired tokens go (each as a tombstone that is forgotten a day later)."""
        return [self.map.delete("token", t.id, self.origin) for t in self.tokens() if t.expired(now)]

    def create_project(self, project: Project) -> list[Record]:
        if self.project(project.name) is not None:
            raise Conflict(f'Project "{project.name}" already exists')
        return self.put("project", project.name, project.to_value())

    def update_project(self, project: Project) -> list[Record]:
        if self.project(project.name) is None:
            raise NotFound("Project not found")
        return self.put("project", project.name, project.to_value())

    def delete_project(self, name: str) -> list[Record]:
        if name == proj.DEFAULT:
            raise Forbidden("The 'default' project cannot be deleted")
        if self.project(name) is None:
            raise NotFound("Project not found")
        return [self.map.delete("project", name, self.origin)]

    def rename_project(self, old: str, new: str) -> list[Record]:
        current = self.project(old)
        if current is None:
            raise NotFound("Project not found")
        if old == proj.DEFAULT:
            raise Forbidden("The 'default' project cannot be renamed")
        if self.project(new) is not None:
            raise Conflict(f'Project "{new}" already exists')
        renamed = Project(new, current.description, current.config)
        return [*self.put("project", new, renamed.to_value()), self.map.delete("project", old, self.origin)]

    def set_config(self, key: str, value: str | None) -> list[Record]:
        return self.put("config", key, None if value is None else {"value": value})


def _expiry(token: Token) -> float:
    base = token.expires_at.timestamp() if token.expires_at is not None else time.time() + 365 * 86_400
    return base + TOMBSTONE_GRACE

