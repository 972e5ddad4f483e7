"""Where the head keeps Ray's cluster state (GCS fault tolerance): a Redis server, so the head's Ray
processes can die and come back without the members, their actors or the key-value store (directory,
member table, trust store) being lost.

``execbroker up --cluster --redis local`` runs Debian's ``redis-server`` as a child of its own: TLS only
(no plaintext port), on loopback (the GCS is its only client and runs on this machine), clients
authenticated by a certificate (no password: Ray would put one on every worker's command line), its
append-only file in ``<data>/gcs-redis``, so a restarted head (or Redis) finds everything again.
``--redis HOST:PORT`` names an existing Redis instead (``rediss://HOST:PORT`` for TLS, with Ray's
``RAY_REDIS_CA_CERT``, ``RAY_REDIS_CLIENT_CERT`` and ``RAY_REDIS_CLIENT_KEY`` in the environment), as
KubeRay's ``RAY_REDIS_ADDRESS`` does; Ray 2.60 takes a Redis password only on its command line, which
``up`` does not pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from core import certs

LOOPBACK = "127.0.0.1"
CONFIG = """\
bind {host}
port 0
tls-port {port}
tls-cert-file "{dir}/redis.crt"
tls-key-file "{dir}/redis.key"
tls-ca-cert-file "{dir}/ca.crt"
tls-auth-clients yes
tls-replication no
protected-mode yes
dir "{dir}"
pidfile "{dir}/redis.pid"
appendonly yes
appendfsync always
save ""
daemonize no
logfile ""
"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A redis-server of the head's own under ``<data>/gcs-redis`` (0700): its port is kept there, so
    a restarted head serves the same address and finds the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "gcs-redis"
        self.proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """Chosen once and kept in the data dir."""
        if not self._port:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            saved = self.dir / "port"
            self._port = int(saved.read_text()) if saved.exists() else _free_port(LOOPBACK)
            saved.write_text(str(self._port))
        return self._port

    @property
    def address(self) -> str:
        return f"rediss://{LOOPBACK}:{self.port}"

    def ray_env(self) -> dict[str, str]:
        """What Ray's GCS needs to use it (the client certificate is the server's own)."""
        return {"RAY_REDIS_ADDRESS": self.address, "RAY_REDIS_CA_CERT": str(self.dir / "ca.crt"),
                "RAY_REDIS_CLIENT_CERT": str(self.dir / "redis.crt"),
                "RAY_REDIS_CLIENT_KEY": str(self.dir / "redis.key")}

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("--redis local needs Debian's redis-server (deploy/system-deps.sh installs it)")
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.dir.chmod(0o700)
        self._ensure_cert()
        conf = self.dir / "redis.conf"
        conf.write_text(CONFIG.format(host=LOOPBACK, port=self.port, dir=self.dir))
        conf.chmod(0o600)
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - kept by the child
        self.proc = subprocess.Popen([binary, str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.dir / 'redis.log'}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    pass
                if self.proc.poll() is None:  # ours listens (not a leftover that made ours fail)
                    return
                continue
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not listen on {self.port}") from None
                time.sleep(0.05)

    def _ensure_cert(self) -> None:
        """A CA of its own (its key is not kept) and one certificate it signed, which Redis presents as
        the server and Ray's GCS as the client; nobody else can get one."""
        ca, cert, key = self.dir / "ca.crt", self.dir / "redis.crt", self.dir / "redis.key"
        if ca.exists() and cert.exists() and key.exists():
            return
        authority = certs.generate_ca("execbroker-gcs-redis-ca")
        cert_pem, key_pem = certs.generate("execbroker-gcs-redis", ip_addresses=[LOOPBACK], issuer=authority)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        cert.write_text(cert_pem)
        ca.write_text(authority[0])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # redis flushes its append-only file and exits
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class ExternalRedis:
    """An existing Redis named by address (``host:port``, ``redis://`` or ``rediss://``): nothing to run."""

    def __init__(self, address: str) -> None:
        self.address = address

    def ray_env(self) -> dict[str, str]:
        return {"RAY_REDIS_ADDRESS": self.address}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
