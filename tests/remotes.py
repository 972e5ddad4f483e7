"""HTTPS clients of a broker as users elsewhere have them: each an ``lxc`` client config of its own
(client certificate, remotes), run as another uid (65534) that has no access to the unix socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import Endpoint

CLIENT_UID = 65534


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enable_https(ep: Endpoint) -> str:
    """Serve HTTPS on a free loopback port, set the way a user would (``lxc config set``)."""
    address = f"127.0.0.1:{free_port()}"
    r = ep.lxc("config", "set", "core.https_address", address)
    assert r.returncode == 0, r.stderr
    return address


def issue_token(ep: Endpoint, name: str, *flags: str) -> str:
    r = ep.lxc("config", "trust", "add", "--name", name, *flags)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip().splitlines()[-1]


@dataclass
class Remote:
    """One client machine: its lxc config dir (owned by CLIENT_UID) and the remotes it added."""

    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ebremote-", dir="/tmp")))

    def __post_init__(self) -> None:
        os.chown(self.home, CLIENT_UID, CLIENT_UID)
        self.home.chmod(0o700)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LXD_", "EXECBROKER_"))}
        return {**env, "HOME": str(self.home), "LXD_CONF": str(self.home / "lxc")}

    def lxc(self, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["lxc", *args], input=input, capture_output=True, env=self.env, timeout=timeout,
                              user=CLIENT_UID, group=CLIENT_UID, extra_groups=[], cwd=self.home)

    def add(self, remote: str, token: str) -> subprocess.CompletedProcess[bytes]:
        return self.lxc("remote", "add", remote, token)

    @property
    def cert(self) -> Path:
        return self.home / "lxc" / "client.crt"

    @property
    def key(self) -> Path:
        return self.home / "lxc" / "client.key"

    def server_cert(self, remote: str) -> Path:
        return self.home / "lxc" / "servercerts" / f"{remote}.crt"

    def fingerprint(self) -> str:
        from cryptography import x509

        from core import certs

        return certs.fingerprint(x509.load_pem_x509_certificate(self.cert.read_bytes()))

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
