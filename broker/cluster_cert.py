"""The cluster certificate: one key pair shared by every member (as Incus shares ``cluster.crt``), the
server certificate of every HTTPS listener (a client trusts the cluster once and may talk to any member)
and the identity members present to each other (mutual TLS on the member listener).

The first member generates it. It is kept in each member's data dir (``cluster.crt``, ``cluster.key``,
mode 0600) and published in Ray's key-value store: the certificate as is, the key sealed under a key
derived from the Ray cluster token, which every member must already hold to join, so the key never
crosses Ray's channel in clear. A joining member without the files fetches and opens it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from core import certs
from core.sealing import Sealer, SealError

KV_CERT = b"execbroker/cluster.crt"
KV_KEY = b"execbroker/cluster.key.sealed"
DNS_NAMES = ("execbroker", "localhost")  # the first is what Go clients check a pinned certificate against
IP_ADDRESSES = ("127.0.0.1", "::1")


class KV(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> bool:
        """Store ``value`` unless the key exists; True if it was stored."""
        ...


class ClusterCertError(Exception):
    pass


@dataclass(frozen=True)
class ClusterCert:
    cert_pem: str
    key_pem: str
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        return certs.fingerprint(x509.load_pem_x509_certificate(self.cert_pem.encode()))


def ensure(data_dir: Path, kv: KV, cluster_secret: str | None) -> ClusterCert:
    """This member's copy of the cluster certificate, generated, fetched or published as needed."""
    cert_path, key_path = data_dir / "cluster.crt", data_dir / "cluster.key"
    local = _read(cert_path, key_path)
    sealer = Sealer(cluster_secret.encode(), "cluster key") if cluster_secret else None
    published = kv.get(KV_CERT)
    if published is None:
        cert_pem, key_pem = local or certs.generate("execbroker cluster", DNS_NAMES, IP_ADDRESSES)
        sealed = sealer.seal(key_pem).encode() if sealer is not None else b""
        if kv.put(KV_CERT, cert_pem.encode()):
            if sealed:
                kv.put(KV_KEY, sealed)
        else:  # another member published first: theirs is the cluster's
            published = kv.get(KV_CERT)
    if published is not None:
        cert_pem = published.decode()
        if local is not None:
            if local[0] != cert_pem:
                raise ClusterCertError(f"{cert_path} is not this cluster's certificate: remove it (and "
                                       f"{key_path}) to fetch the cluster's, or join the cluster it belongs to")
            key_pem = local[1]
        else:
            key_pem = _fetch_key(kv, sealer, cert_path, key_path)
    _write(cert_path, key_path, cert_pem, key_pem)
    return ClusterCert(cert_pem, key_pem, cert_path, key_path)


def _fetch_key(kv: KV, sealer: Sealer | None, cert_path: Path, key_path: Path) -> str:
    sealed = kv.get(KV_KEY)
    if sealer is None or sealed is None:
        raise ClusterCertError(f"the cluster's key is not published (Ray token auth is off): copy {cert_path.name} "
                               f"and {key_path.name} from another member into {cert_path.parent}")
    try:
        return sealer.open(sealed.decode())
    except SealError:
        raise ClusterCertError("the cluster's key does not open with this node's Ray token") from None


def _read(cert_path: Path, key_path: Path) -> tuple[str, str] | None:
    try:
        return cert_path.read_text(), key_path.read_text()
    except FileNotFoundError:
        return None


def _write(cert_path: Path, key_path: Path, cert_pem: str, key_pem: str) -> None:
    for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
        if path.exists() and path.read_text() == text:
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def ray_cluster_secret() -> str | None:
    """The Ray cluster token every member holds (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
    names, or ``~/.ray/auth_token``); None with token auth off."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class RayKV:
    """Ray's GCS key-value store, as ``ensure`` uses it (call inside a Ray worker or driver)."""

    def get(self, key: bytes) -> bytes | None:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(key)
        return bytes(value) if value is not None else None

    def put(self, key: bytes, value: bytes) -> bool:
        from ray.experimental import internal_kv

        # returns whether the key already existed
        return not internal_kv._internal_kv_put(key, value, overwrite=False)
