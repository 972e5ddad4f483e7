"""Pure pieces of `execbroker up`'s cluster start: the node address a one-machine cluster advertises,
Ray's health-check defaults, the GCS store's certificates and its stale-head pointer (no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker import gcs_store, raynode, up
from core import certs


@pytest.mark.parametrize(("given", "kept"), [
    ("127.0.0.1", "127.0.0.2"), ("::1", "127.0.0.2"), ("localhost", "127.0.0.2"),
    ("127.0.0.3", "127.0.0.3"), ("10.0.0.5", "10.0.0.5"),
])
def test_advertised_ip_is_one_ray_keeps(given: str, kept: str) -> None:
    assert raynode.advertised_ip(given) == kept


def test_node_ip_defaults() -> None:
    assert up._node_ip("10.1.2.3", None, True) == "10.1.2.3"  # given wins
    assert raynode.advertised_ip(up._node_ip(None, None, False)) == raynode.LOOPBACK_NODE_IP  # single node
    joined = raynode.advertised_ip(up._node_ip(None, "127.0.0.2:6379", True))  # joining a head on this machine
    assert joined.startswith("127.") and joined != "127.0.0.1"


def test_health_checks_surface_a_loss_within_5s_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    h = raynode.HEALTH_CHECKS
    worst = int(h["RAY_health_check_failure_threshold"]) * (
        int(h["RAY_health_check_period_ms"]) + int(h["RAY_health_check_timeout_ms"])) / 1000
    assert worst <= 6  # probes every period, each may take its timeout; plus the agents' 1 s refresh
    monkeypatch.setenv("RAY_health_check_period_ms", "5000")
    node = raynode.RayNode(head=True, node_ip="127.0.0.2", name="n1", port=1234)
    assert node.env["RAY_health_check_period_ms"] == "5000"
    assert node.env["RAY_health_check_failure_threshold"] == h["RAY_health_check_failure_threshold"]
    assert f"{raynode.START_LABEL}={node.start_id}" in " ".join(node.command())


def test_gcs_store_certificate_is_signed_by_its_ca(tmp_path: Path) -> None:
    store = gcs_store.LocalRedis(tmp_path)
    store.dir.mkdir(mode=0o700)
    store._ensure_cert()
    ca = x509.load_pem_x509_certificate((store.dir / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((store.dir / "redis.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer == ca.subject
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(ca)
    assert (store.dir / "redis.key").stat().st_mode & 0o077 == 0
    env = store.ray_env()
    assert env["RAY_REDIS_ADDRESS"] == f"rediss://127.0.0.1:{store.port}" and store.port > 0
    assert gcs_store.LocalRedis(tmp_path).port == store.port  # kept across restarts


def test_generate_with_issuer() -> None:
    authority = certs.generate_ca("ca")
    cert_pem, _ = certs.generate("leaf", issuer=authority)
    x509.load_pem_x509_certificate(cert_pem.encode()).verify_directly_issued_by(certs.load(authority[0]))


def test_gcs_port_kept_with_a_store(tmp_path: Path) -> None:
    args = argparse.Namespace(port=None)
    first = up._gcs_port(args, tmp_path, keep=True)
    assert first and up._gcs_port(args, tmp_path, keep=True) == first
    assert up._gcs_port(args, tmp_path / "x", keep=False) is None


def test_stale_head_pointer_removed_only_for_this_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    pointer = tmp_path / "ray" / "ray_current_cluster"
    pointer.parent.mkdir()
    pointer.write_text("127.0.0.2:7000\n")
    up._forget_stale_head("127.0.0.2:7001")
    assert pointer.exists()
    up._forget_stale_head("127.0.0.2:7000")
    assert not pointer.exists()

