"""Sealed secrets: a string encrypted and authenticated (Fernet: AES-128-CBC + HMAC-SHA256, from the
``cryptography`` package) under a key derived with HKDF-SHA256 from a secret every member already holds,
so what crosses Ray's channel or sits in its key-value store is never the secret in clear."""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class SealError(Exception):
    """A sealed value that does not open under this key (another cluster's, or tampered with)."""


class Sealer:
    def __init__(self, secret: bytes, purpose: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"execbroker {purpose}".encode()).derive(secret)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except (InvalidToken, ValueError) as exc:
            raise SealError("sealed value does not open with this key") from exc
