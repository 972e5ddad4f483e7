"""Server-side TLS for the HTTPS and member listeners, terminated with pyOpenSSL over a plain asyncio
transport. The plaintext goes to an inner protocol (uvicorn's HTTP protocol, then its websocket
protocol after an upgrade) through ``TLSTransport``.

Why not the stdlib ``ssl`` module: Incus clients authenticate with self-signed certificates that the
server may not trust yet (``lxc remote add`` with a token presents its certificate, then asks to be
trusted), so the server must *request* a client certificate without verifying its chain, as Go's
``tls.RequestClientCert`` does. OpenSSL's verify callback allows that; Python's ``ssl`` does not expose
it (with ``CERT_OPTIONAL`` an unknown certificate aborts the handshake). The client still proves it
holds the certificate's key (the handshake's CertificateVerify); who it is, is then decided by the
certificate's fingerprint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from core import certs

HANDSHAKE_TIMEOUT = 5.0  # seconds for a client to complete its TLS handshake
READ_CHUNK = 1 << 18
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.2: forward-secret AEAD only (TLS 1.3's are all of that)


def server_context(cert_pem: str, key_pem: str, require_client_cert: bool = False,
                   alpn: tuple[bytes, ...] = ()) -> SSL.Context:
    """TLS 1.2+ with the given server certificate; a client certificate is requested (and, with
    ``require_client_cert``, required), its chain never verified here (see the module docstring).
    ``alpn``: application protocols this listener selects when a client offers one of them (a client
    offering none of them goes on without ALPN, as HTTP clients do)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # no session tickets: neither the Go client nor requests resumes sessions, and issuing them cost a
    # third of the server's handshake (1.3 -> 0.9 ms, measured)
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_COMPRESSION
                    | SSL.OP_NO_TICKET)
    ctx.set_cipher_list(CIPHERS)
    ctx.use_certificate(x509.load_pem_x509_certificate(cert_pem.encode()))
    ctx.use_privatekey(serialization.load_pem_private_key(key_pem.encode(), password=None))  # type: ignore[arg-type]
    ctx.check_privatekey()
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require_client_cert else 0)
    ctx.set_verify(mode, lambda _conn, _cert, _errno, _depth, _ok: True)
    if alpn:
        def select(_conn: SSL.Connection, offered: list[bytes]) -> bytes:
            return next((p for p in offered if p in alpn), SSL.NO_OVERLAPPING_PROTOCOLS)  # type: ignore[arg-type]

        ctx.set_alpn_select_callback(select)
    return ctx


class TLSConnection(asyncio.Protocol):
    """One TLS connection: ciphertext from the socket, plaintext to ``inner`` once the handshake is done.

    ``on_handshake(fingerprint)`` decides, before any byte reaches ``inner``, whether the connection may go
    on (False closes it); ``fingerprint`` is the client certificate's, or "" without one."""

    def __init__(self, context: SSL.Context, inner: asyncio.Protocol,
                 on_handshake: Callable[[str, TLSTransport], bool],
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._context = context
        self.inner = inner
        self._on_handshake = on_handshake
        self._timeout = handshake_timeout
        self._raw: asyncio.Transport | None = None
        self._ssl: SSL.Connection | None = None
        self._transport: TLSTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flush_soon: asyncio.Handle | None = None
        self.closing = False

    # -- from the socket ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        self._ssl = SSL.Connection(self._context, None)
        self._ssl.set_accept_state()
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.closing or self._ssl is None:
            return
        try:
            self._ssl.bio_write(data)
            if self._transport is None and not self._handshake():
                return
            self._read_plaintext()
        except SSL.Error:
            self._abort()
        finally:
            self._flush()

    def eof_received(self) -> bool | None:
        if self._transport is not None and not self.closing:
            return self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self.inner.resume_writing()

    # -- TLS ------------------------------------------------------------------------------------------
    def _handshake(self) -> bool:
        assert self._ssl is not None and self._raw is not None
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            return False
        if self._timer is not None:
            self._timer.cancel()
        peer = self._ssl.get_peer_certificate(as_cryptography=True)
        fingerprint = certs.fingerprint(peer) if peer is not None else ""
        transport = TLSTransport(self, self._raw, self._ssl, self._context, fingerprint, peer)
        if not self._on_handshake(fingerprint, transport):
            self._abort()
            return False
        self._transport = transport
        self.inner.connection_made(transport)
        return True

    def _read_plaintext(self) -> None:
        assert self._ssl is not None
        while not self.closing:
            try:
                data = self._ssl.recv(READ_CHUNK)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:  # the client's close_notify: it sends nothing more
                self.inner.eof_received()
                if self._transport is not None:
                    self._transport.close()
                return
            self.inner.data_received(data)  # may switch ``inner`` (websocket upgrade): the loop follows

    def flush_soon(self) -> None:
        """Send what is encrypted at the end of this loop turn: the writes of one turn (a response's
        headers and body, a burst of frames) leave in one send()."""
        if self._flush_soon is None:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = None
        if self._ssl is None or self._raw is None or self._raw.is_closing():
            return
        chunks = []
        while True:
            try:
                chunk = self._ssl.bio_read(READ_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < READ_CHUNK:  # the BIO is empty: no need to ask again
                break
        if chunks:
            self._raw.write(b"".join(chunks))

    def _handshake_timed_out(self) -> None:
        if self._transport is None:
            self._abort()

    def _abort(self) -> None:
        self.closing = True
        if self._raw is not None:
            self._raw.abort()


class TLSTransport(asyncio.Transport):
    """What the inner protocol writes to: plaintext in, TLS records out on the socket's transport."""

    def __init__(self, owner: TLSConnection, raw: asyncio.Transport, ssl: SSL.Connection,
                 context: SSL.Context, fingerprint: str, certificate: x509.Certificate | None) -> None:
        super().__init__()
        self._owner = owner
        self._raw = raw
        self._ssl = ssl
        self._context = context
        self.fingerprint = fingerprint  # the client certificate's SHA-256, "" without one
        self.certificate = certificate

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._owner.closing or self._raw.is_closing():
            return
        try:
            self._ssl.sendall(data)
        except SSL.Error:
            self._owner._abort()
            return
        self._owner.flush_soon()

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._owner.closing:
            return
        self._owner.closing = True
        try:
            self._ssl.shutdown()  # close_notify; the peer's answer is not awaited
        except SSL.Error:
            pass
        self._owner._flush()
        self._raw.close()

    def abort(self) -> None:
        self._owner._abort()

    def is_closing(self) -> bool:
        return self._owner.closing or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self._context  # what servers read to tell https from http
        if name == "peer_fingerprint":
            return self.fingerprint
        if name == "peer_certificate":
            return self.certificate
        if name == "alpn_protocol":
            return self._ssl.get_alpn_proto_negotiated() or b""
        return self._raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._owner.inner = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._owner.inner
