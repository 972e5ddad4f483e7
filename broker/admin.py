"""Cluster administration as the Incus API offers it: the server config (``PUT/PATCH /1.0``), the trust
store (``/1.0/certificates``, tokens as ``token`` operations) and projects (``/1.0/projects``), with who
may do what (a restricted certificate reads, and renews its own certificate; nothing more)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from broker.server_state import ServerState
from core import certs, timefmt
from core import projects as proj
from core.errors import BadRequest, Forbidden, NotFound
from core.identity import Identity
from core.projects import Project
from core.sealing import Sealer
from core.server_records import CLUSTER_KEYS, MAX_CONNECTIONS, MAX_OPERATIONS, TOKEN_EXPIRY
from core.trust import (
    Certificate,
    CertificateRequest,
    certificate_from,
    expires_at,
    hash_secret,
    new_token,
    patch_certificate,
    secret_of,
)
from node_agent.runtime.records import write_private

HTTPS_ADDRESS = "core.https_address"
MEMBER_KEYS = (HTTPS_ADDRESS,)
RESTRICTED = "Certificate is restricted"


def require_admin(who: Identity) -> None:
    if who.restricted:
        raise Forbidden(RESTRICTED)


def check_https_address(value: str) -> str:
    """``host:port`` (``[v6]:port``); the host must be an IP address this node can bind."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not 0 < int(port) < 65536:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(f"cannot set '{HTTPS_ADDRESS}' to '{value}': expected IP:PORT") from None
    return value


def check_config_value(key: str, value: str) -> None:
    if key == HTTPS_ADDRESS:
        check_https_address(value)
    elif key == TOKEN_EXPIRY:
        try:
            expires_at(value, timefmt.now())
        except BadRequest:
            raise BadRequest(f"cannot set '{key}' to '{value}': Invalid expiry expression") from None
    elif key in (MAX_CONNECTIONS, MAX_OPERATIONS):
        if not value.isdigit() or int(value) < 1:
            raise BadRequest(f"cannot set '{key}' to '{value}': must be a whole number of at least 1")
    else:
        raise BadRequest(f"cannot set '{key}' to '{value}': unknown key")


class MemberConfig:
    """The config keys that belong to one member (where it listens), kept in its data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "server.json"
        try:
            loaded = json.loads(self.path.read_text())
            self.values: dict[str, str] = {k: str(v) for k, v in loaded.items() if k in MEMBER_KEYS}
        except (OSError, ValueError, AttributeError):
            self.values = {}

    def save(self) -> None:
        write_private(self.path, json.dumps(self.values, indent=1))


class Admin:
    def __init__(self, state: ServerState, member: MemberConfig, cluster_cert_pem: str, sealer: Sealer,
                 addresses: Callable[[], list[str]], location: Callable[[], str],
                 project_in_use: Callable[[], Awaitable[dict[str, list[str]]]],
                 on_https_address: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.state = state
        self.member = member
        self.cluster_cert_pem = cluster_cert_pem
        self.cluster_fingerprint = certs.fingerprint(x509.load_pem_x509_certificate(cluster_cert_pem.encode()))
        self._sealer = sealer
        self._addresses = addresses
        self._location = location
        self._project_in_use = project_in_use
        self._on_https_address = on_https_address

    @property
    def records(self):  # type: ignore[no-untyped-def]
        return self.state.records

    # -- server config --------------------------------------------------------------------------------
    def server_details(self, who: Identity) -> dict[str, Any]:
        """What ``GET /1.0`` adds to the node's own description: config, addresses, certificate."""
        https = self.member.values.get(HTTPS_ADDRESS, "")
        return {"config": self.config(), "addresses": [https] if https else [],
                "certificate": self.cluster_cert_pem, "fingerprint": self.cluster_fingerprint}

    def config(self) -> dict[str, str]:
        return {**self.records.config(), **self.member.values}

    async def update_config(self, who: Identity, body: dict[str, Any], replace: bool) -> None:
        """PUT (``replace``: keys not given are unset) or PATCH of ``config`` in ``/1.0``."""
        require_admin(who)
        given = body.get("config")
        if given is None:
            given = {}
        if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
            raise BadRequest("Server config must map strings to strings")
        wanted = dict(given) if replace else {**self.config(), **given}
        wanted = {k: v for k, v in wanted.items() if v != ""}  # "" unsets, as Incus does
        for key, value in wanted.items():
            check_config_value(key, value)
        current = self.config()
        for key in sorted(set(current) | set(wanted)):
            if current.get(key) == wanted.get(key):
                continue
            if key in MEMBER_KEYS:
                await self._set_member_key(key, wanted.get(key))
            elif key in CLUSTER_KEYS:
                await self.state.change("set_config", key, wanted.get(key))

    async def _set_member_key(self, key: str, value: str | None) -> None:
        if key == HTTPS_ADDRESS and self._on_https_address is not None:
            await self._on_https_address(value or "")  # bind first: a bad address changes nothing
        if value is None:
            self.member.values.pop(key, None)
        else:
            self.member.values[key] = value
        self.member.save()

    # -- certificates ---------------------------------------------------------------------------------
    def list_certificates(self, recursion: int) -> list[Any]:
        found = self.records.certificates()
        if recursion:
            return [c.to_api() for c in found]
        return [f"/1.0/certificates/{c.fingerprint}" for c in found]

    def get_certificate(self, fingerprint: str) -> dict[str, Any]:
        return self.records.find_certificate(fingerprint).to_api()

    async def add_certificate(self, who: Identity | None, body: dict[str, Any], peer: x509.Certificate | None
                              ) -> dict[str, Any] | None:
        """POST /1.0/certificates. Returns a token operation (``token: true``), else None (added).

        ``who`` None: an untrusted TLS client, which may only present a token for its own certificate."""
        req = CertificateRequest.parse(body)
        if who is None:
            if peer is None or not req.password:
                raise Forbidden("not authorized")
            return await self._join_with_token(req, peer)
        require_admin(who)
        if req.token:
            return await self._issue_token(req)
        if req.certificate:
            material = certs.load(req.certificate)
        elif peer is not None:
            material = peer
        else:
            raise BadRequest("Can't use TLS data on non-TLS link")
        await self.state.change("add_certificate", certificate_from(material, req, req.name))
        return None

    async def _issue_token(self, req: CertificateRequest) -> dict[str, Any]:
        if not req.name:
            raise BadRequest("A name is required for a token")
        token, secret = new_token(req, self.records.config().get(TOKEN_EXPIRY, ""), self._sealer.seal)
        await self.state.change("add_token", token)
        return token.operation(secret, self.cluster_fingerprint, self._addresses(), self._location())

    async def _join_with_token(self, req: CertificateRequest, peer: x509.Certificate) -> None:
        if self.records.certificate(certs.fingerprint(peer)) is not None:
            raise BadRequest("Client is already trusted")
        token = await self.state.change("consume_token", hash_secret(secret_of(req.password)), timefmt.now())
        await self.state.change("add_certificate", certificate_from(peer, token, req.name or token.name))

    async def update_certificate(self, who: Identity, fingerprint: str, body: dict[str, Any], full: bool) -> None:
        cert = self.records.find_certificate(fingerprint)
        updated = patch_certificate(cert, body, full)
        material = body.get("certificate")
        renewed = None
        if material:
            renewed = certs.load(material)
        if who.restricted:
            # a restricted client may renew its own certificate, and change nothing else
            if who.username != cert.fingerprint or updated != cert:
                raise Forbidden(RESTRICTED)
        if renewed is not None and certs.fingerprint(renewed) != cert.fingerprint:
            replacement = Certificate(certs.fingerprint(renewed), updated.name, updated.type, certs.to_pem(renewed),
                                      updated.restricted, updated.projects, updated.description)
            await self.state.change("add_certificate", replacement)
            await self.state.change("remove_certificate", cert.fingerprint)
            return
        await self.state.change("update_certificate", updated)

    async def remove_certificate(self, who: Identity, fingerprint: str) -> None:
        cert = self.records.find_certificate(fingerprint)
        if who.restricted and who.username != cert.fingerprint:
            raise Forbidden(RESTRICTED)
        await self.state.change("remove_certificate", cert.fingerprint)

    # -- tokens, as operations ------------------------------------------------------------------------
    def token_operations(self) -> list[dict[str, Any]]:
        now = timefmt.now()
        return [self._token_op(t) for t in self.records.tokens() if not t.expired(now)]

    def token_operation(self, op_id: str) -> dict[str, Any] | None:
        token = self.records.token(op_id)
        return None if token is None or token.expired(timefmt.now()) else self._token_op(token)

    def _token_op(self, token: Any) -> dict[str, Any]:
        return token.operation(self._sealer.open(token.sealed_secret), self.cluster_fingerprint,
                               self._addresses(), self._location())

    async def revoke_token(self, op_id: str) -> None:
        await self.state.change("revoke_token", op_id)

    # -- projects -------------------------------------------------------------------------------------
    def visible_projects(self, who: Identity) -> list[Project]:
        return [p for p in self.records.projects() if who.allows(p.name)]

    async def list_projects(self, who: Identity, recursion: int) -> list[Any]:
        found = self.visible_projects(who)
        if recursion:
            used = await self._project_in_use()
            return [p.to_api(used.get(p.name, [])) for p in found]
        return [f"/1.0/projects/{p.name}" for p in found]

    def project(self, who: Identity, name: str) -> Project:
        found = self.records.project(name)
        if found is None or not who.allows(name):
            raise NotFound("Project not found")
        return found

    async def get_project(self, who: Identity, name: str) -> dict[str, Any]:
        return self.project(who, name).to_api((await self._project_in_use()).get(name, []))

    async def create_project(self, who: Identity, body: dict[str, Any]) -> None:
        require_admin(who)
        name = proj.validate_name(body.get("name"))
        config = proj.validate_config(body.get("config"))
        project = Project(name, proj.validate_description(body.get("description")),
                          {**proj.NEW_PROJECT_CONFIG, **config})
        await self.state.change("create_project", project)

    async def update_project(self, who: Identity, name: str, body: dict[str, Any], replace: bool) -> None:
        require_admin(who)
        current = self.project(who, name)
        config = proj.validate_config(body.get("config")) if "config" in body or replace else current.config
        if not replace and "config" in body:
            config = {**current.config, **config}
        description = proj.validate_description(body.get("description", None if replace else current.description))
        await self.state.change("update_project", Project(name, description, config))

    async def rename_project(self, who: Identity, name: str, body: dict[str, Any]) -> None:
        require_admin(who)
        self.project(who, name)
        new = proj.validate_name(body.get("name"))
        if (await self._project_in_use()).get(name):
            raise BadRequest("Only empty projects can be renamed")
        await self.state.change("rename_project", name, new)

    async def delete_project(self, who: Identity, name: str) -> None:
        require_admin(who)
        self.project(who, name)
        if name != proj.DEFAULT and (await self._project_in_use()).get(name):
            raise BadRequest("Only empty projects can be removed")
        await self.state.change("delete_project", name)

    def check_project(self, who: Identity, name: str) -> str:
        """The project a request names, if it exists and the caller may use it (Incus: 403 for a project
        the certificate is not restricted to, 404 for one that does not exist)."""
        if not who.allows(name):
            raise Forbidden(f'User does not have permission for project "{name}"')
        if self.records.project(name) is None:
            raise NotFound("Project not found")
        return name

