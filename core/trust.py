"""The trust store's vocabulary (spec: Incus ``/1.0/certificates``): trusted client certificates, the
one-time tokens that let a client add its own certificate, and their wire forms as lxd-client 5.0.2
sends and reads them. IO-free; the records live in the replicated map (core/replicated.py)."""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from cryptography import x509

from core import certs, timefmt
from core.errors import BadRequest, Forbidden

CertType = Literal["client", "metrics"]
CERT_TYPES: tuple[CertType, ...] = ("client", "metrics")
MAX_NAME = 255
MAX_PROJECTS = 1000
MAX_TOKENS = 1000  # pending tokens in the cluster
MAX_TOKEN = 16 << 10  # a token string a client presents
NO_MATCH = "No matching certificate add operation found"
EXPIRED = "Failed during search for certificate add token operation: Token has expired"


@dataclass(frozen=True)
class Certificate:
    fingerprint: str
    name: str
    type: CertType
    certificate: str  # PEM
    restricted: bool = False
    projects: tuple[str, ...] = ()
    description: str = ""

    def to_value(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "certificate": self.certificate,
                "restricted": self.restricted, "projects": list(self.projects), "description": self.description}

    @classmethod
    def from_value(cls, fingerprint: str, v: dict[str, Any]) -> Certificate:
        return cls(fingerprint, str(v["name"]), v["type"], str(v["certificate"]), bool(v.get("restricted")),
                   tuple(v.get("projects") or ()), str(v.get("description", "")))

    def to_api(self) -> dict[str, Any]:
        """The Incus Certificate object."""
        return {"name": self.name, "type": self.type, "restricted": self.restricted,
                "projects": list(self.projects), "certificate": self.certificate,
                "fingerprint": self.fingerprint, "description": self.description}

    def allows(self, project: str) -> bool:
        return not self.restricted or project in self.projects


@dataclass(frozen=True)
class Token:
    """A pending ``trust add`` token: shown to clients as a Running operation of class ``token``.

    The record holds the secret's SHA-256 (what a client's token is matched against) and the secret
    sealed under a key only members derive (what ``list-tokens`` shows again), never the secret itself."""

    id: str  # the operation's id
    name: str
    secret_hash: str
    sealed_secret: str
    type: CertType = "client"
    restricted: bool = False
    projects: tuple[str, ...] = ()
    created_at: datetime = field(default_factory=timefmt.now)
    expires_at: datetime | None = None

    def to_value(self) -> dict[str, Any]:
        return {"name": self.name, "secret_hash": self.secret_hash, "sealed_secret": self.sealed_secret,
                "type": self.type, "restricted": self.restricted, "projects": list(self.projects),
                "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat() if self.expires_at else None}

    @classmethod
    def from_value(cls, token_id: str, v: dict[str, Any]) -> Token:
        return cls(token_id, str(v["name"]), str(v["secret_hash"]), str(v["sealed_secret"]), v.get("type", "client"),
                   bool(v.get("restricted")), tuple(v.get("projects") or ()), datetime.fromisoformat(v["created_at"]),
                   datetime.fromisoformat(v["expires_at"]) if v.get("expires_at") else None)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def encode(self, secret: str, fingerprint: str, addresses: list[str]) -> str:
        """The token string ``lxc remote add`` takes: base64 of what lxd-client 5.0.2 decodes."""
        doc = {"client_name": self.name, "fingerprint": fingerprint, "addresses": addresses,
               "secret": secret, "expires_at": timefmt.rfc3339(self.expires_at)}
        return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()

    def operation(self, secret: str, fingerprint: str, addresses: list[str], location: str) -> dict[str, Any]:
        """The token as the Running ``token`` operation ``lxc config trust list-tokens`` reads."""
        metadata: dict[str, Any] = {
            "addresses": addresses, "fingerprint": fingerprint, "secret": secret,
            "request": {"name": self.name, "type": self.type, "restricted": self.restricted,
                        "projects": list(self.projects), "certificate": "", "password": "", "token": True},
        }
        if self.expires_at is not None:
            metadata["expiresAt"] = timefmt.rfc3339(self.expires_at)
        stamp = timefmt.rfc3339(self.created_at)
        return {"id": self.id, "class": "token", "description": "Executing operation", "created_at": stamp,
                "updated_at": stamp, "status": "Running", "status_code": 103, "resources": None,
                "metadata": metadata, "may_cancel": True, "err": "", "location": location}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(request: CertificateRequest, expiry: str, seal: Callable[[str], str],
              now: datetime | None = None) -> tuple[Token, str]:
    """A token for ``request`` and its secret (which only the caller sees in clear)."""
    now = now or timefmt.now()
    secret = secrets.token_hex(32)
    token = Token(str(uuid.uuid4()), request.name, hash_secret(secret), seal(secret), request.type,
                  request.restricted, request.projects, now, expires_at(expiry, now))
    return token, secret


def secret_of(token: str) -> str:
    """The secret a client's token string carries; anything unreadable is refused as Incus does."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise Forbidden("not authorized")
    try:
        doc = json.loads(base64.b64decode(token, validate=True))
        secret = doc["secret"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise Forbidden("not authorized") from None
    if not isinstance(secret, str) or not secret:
        raise Forbidden("not authorized")
    return secret


def find_token(tokens: list[Token], secret_hash: str, now: datetime) -> Token:
    """The pending token whose secret has this hash (compared in constant time)."""
    found = None
    for token in tokens:
        if secrets.compare_digest(token.secret_hash.encode(), secret_hash.encode()):
            found = token
    if found is None:
        raise Forbidden(NO_MATCH)
    if found.expired(now):
        raise Forbidden(EXPIRED)
    return found


# ---- requests -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateRequest:
    """``POST /1.0/certificates`` (``CertificatesPost``)."""

    name: str = ""
    type: CertType = "client"
    restricted: bool = False
    projects: tuple[str, ...] = ()
    certificate: str = ""  # base64 DER or PEM; empty: the caller's TLS certificate
    password: str = ""  # the token, as lxd-client 5.0 sends it
    token: bool = False  # ask for a token instead of adding a certificate
    description: str = ""

    @classmethod
    def parse(cls, body: dict[str, Any]) -> CertificateRequest:
        name = _text(body, "name")
        ctype = body.get("type") or "client"
        if ctype not in CERT_TYPES:
            raise BadRequest(f'Unknown certificate type "{ctype}"')
        projects = _projects(body.get("projects"))
        password = _text(body, "password", MAX_TOKEN) or _text(body, "trust_token", MAX_TOKEN)
        return cls(name, ctype, _flag(body, "restricted"), projects, _text(body, "certificate", certs.MAX_PEM),
                   password, _flag(body, "token"), _text(body, "description"))


def patch_certificate(cert: Certificate, body: dict[str, Any], full: bool) -> Certificate:
    """PUT (``full``) or PATCH of a certificate: name, type, restricted, projects, description and
    (for self-renewal) the certificate itself, which must keep the fingerprint's owner: see the caller."""
    def pick(key: str, current: Any) -> Any:
        return body[key] if key in body else (None if full else current)

    name = pick("name", cert.name)
    ctype = pick("type", cert.type) or "client"
    if ctype not in CERT_TYPES:
        raise BadRequest(f'Unknown certificate type "{ctype}"')
    return Certificate(
        cert.fingerprint,
        _text({"name": name or ""}, "name"),
        ctype,
        cert.certificate,
        _flag({"restricted": pick("restricted", cert.restricted) or False}, "restricted"),
        _projects(pick("projects", list(cert.projects))),
        _text({"description": pick("description", cert.description) or ""}, "description"),
    )


def certificate_from(material: x509.Certificate, req: CertificateRequest | Token, name: str) -> Certificate:
    return Certificate(certs.fingerprint(material), name or certs.common_name(material), req.type,
                       certs.to_pem(material), req.restricted, req.projects,
                       getattr(req, "description", ""))


def _text(body: dict[str, Any], key: str, limit: int = MAX_NAME) -> str:
    value = body.get(key) or ""
    if not isinstance(value, str):
        raise BadRequest(f'"{key}" must be a string')
    if len(value) > limit:
        raise BadRequest(f'"{key}" is too long (limit {limit})')
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key) or False
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" must be a boolean')
    return value


def _projects(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest('"projects" must be a list of project names')
    if len(value) > MAX_PROJECTS:
        raise BadRequest(f'"projects" lists too many projects (limit {MAX_PROJECTS})')
    return tuple(dict.fromkeys(value))


# ---- expiry expressions (core.remote_token_expiry) -----------------------------------------------------

_UNITS = {"S": "seconds", "M": "minutes", "H": "hours", "d": "days", "w": "weeks"}
_EXPIRY = re.compile(r"^(\d+)([SMHdwmy])$")


def expires_at(expression: str, now: datetime) -> datetime | None:
    """When a token made ``now`` expires under an expiry expression such as ``30S``, ``1H``, ``1d 12H``
    (units S, M, H, d, w, m for months and y for years, as Incus reads them); "" never."""
    if not expression:
        return None
    total = timedelta()
    months = 0
    for part in expression.split():
        m = _EXPIRY.match(part)
        if m is None:
            raise BadRequest("Invalid expiry expression")
        count, unit = int(m.group(1)), m.group(2)
        if unit in _UNITS:
            total += timedelta(**{_UNITS[unit]: count})
        else:
            months += count * (12 if unit == "y" else 1)
    if months:  # calendar months: 31 January + 1 month is the last day of February
        years, month0 = divmod(now.month - 1 + months, 12)
        year, month = now.year + years, month0 + 1
        now = now.replace(year=year, month=month, day=min(now.day, calendar.monthrange(year, month)[1]))
    return (now + total).astimezone(timezone.utc)
