"""Unit tests (no Ray) of the trust boundary's pure parts: the replicated records, trust tokens and
their wire forms, certificates, sealing, the cluster certificate's life, and projects."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import cluster_cert
from broker.state_actor import StateMachine
from core import certs, projects
from core.errors import ApiError, BadRequest, Forbidden
from core.projects import Project
from core.replicated import Record, ReplicatedMap
from core.sealing import Sealer, SealError
from core.server_records import ServerRecords
from core.trust import (
    EXPIRED,
    NO_MATCH,
    Certificate,
    CertificateRequest,
    expires_at,
    hash_secret,
    new_token,
    secret_of,
)

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)

# ---- the replicated map ------------------------------------------------------------------------------

records = st.lists(st.builds(
    Record, kind=st.sampled_from(["certificate", "project"]), key=st.sampled_from(["a", "b", "c"]),
    value=st.one_of(st.none(), st.fixed_dictionaries({"n": st.integers(0, 3)})), version=st.integers(1, 6),
    origin=st.sampled_from(["m1", "m2"])), max_size=12)


@settings(max_examples=300, deadline=None)
@given(records, st.randoms())
def test_merge_order_does_not_matter(recs: list[Record], rnd: object) -> None:
    shuffled = list(recs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    one, other = ReplicatedMap(recs), ReplicatedMap()
    for half in (shuffled[::2], shuffled[1::2]):
        other.merge(half)
    assert {(r.kind, r.key): r for r in one.records()} == {(r.kind, r.key): r for r in other.records()}
    again = ReplicatedMap(one.records())
    assert again.merge(other.records()) == []  # nothing left to learn


def test_put_delete_and_since() -> None:
    m = ReplicatedMap()
    first = m.put("project", "p1", {"description": ""}, "m1")
    m.delete("project", "p1", "m1")
    assert m.get("project", "p1") is None and m.items("project") == {}
    assert [r.version for r in m.since(first.version)] == [2]
    copy = ReplicatedMap([first])  # a stale copy learns the deletion
    assert copy.merge(m.since(0))[0].value is None


def test_prune_forgets_expired_records_only() -> None:
    m = ReplicatedMap()
    m.put("token", "t", {"x": 1}, "m", expires_at=10.0)
    m.put("project", "p", {}, "m")
    assert [r.key for r in m.prune(now=11.0)] == ["t"] and m.items("project")


def test_record_from_json_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError):
        Record.from_json({"kind": "secret", "key": "k", "value": None, "version": 1})


# ---- certificates and tokens -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pem() -> tuple[str, str]:
    return certs.generate("client", ["execbroker"], ["127.0.0.1"])


def test_certificate_forms(pem: tuple[str, str]) -> None:
    cert = certs.load(pem[0])
    der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    assert certs.fingerprint(certs.load(der)) == certs.fingerprint(cert)  # what `trust add FILE` sends
    assert certs.common_name(cert) == "client"
    for bad in ("", "not base64!", base64.b64encode(b"junk").decode(), "x" * (certs.MAX_PEM + 1)):
        with pytest.raises(BadRequest):
            certs.load(bad)


def test_server_certificate_names_what_go_clients_check(pem: tuple[str, str]) -> None:
    cert = x509.load_pem_x509_certificate(pem[0].encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName)[0] == "execbroker"


def _sealer() -> Sealer:
    return Sealer(b"cluster key", "trust tokens")


def test_token_round_trip() -> None:
    req = CertificateRequest.parse({"name": "ci", "token": True, "restricted": True, "projects": ["p1"]})
    token, secret = new_token(req, "", _sealer().seal, NOW)
    text = token.encode(secret, "f" * 64, ["127.0.0.1:8443"])
    doc = json.loads(base64.b64decode(text))
    assert doc == {"client_name": "ci", "fingerprint": "f" * 64, "addresses": ["127.0.0.1:8443"],
                   "secret": secret, "expires_at": "0001-01-01T00:00:00Z"}
    assert secret_of(text) == secret and token.secret_hash == hash_secret(secret)
    assert secret not in json.dumps(token.to_value())  # the record keeps a hash and a sealed copy only
    assert _sealer().open(token.sealed_secret) == secret
    op = token.operation(secret, "f" * 64, [], "none")
    assert (op["class"], op["status"], op["metadata"]["request"]["projects"]) == ("token", "Running", ["p1"])


@pytest.mark.parametrize("text", ["", "garbage", base64.b64encode(b'{"a": 1}').decode(), "x" * 20000])
def test_unreadable_tokens_are_not_authorized(text: str) -> None:
    with pytest.raises(Forbidden, match="^not authorized$"):
        secret_of(text)


def test_a_token_works_once_and_expires() -> None:
    recs = ServerRecords(origin="cluster")
    req = CertificateRequest.parse({"name": "ci", "token": True})
    token, secret = new_token(req, "1H", _sealer().seal, NOW)
    recs.add_token(token)
    found, _ = recs.consume_token(hash_secret(secret), NOW)
    assert found.name == "ci"
    with pytest.raises(Forbidden, match=f"^{NO_MATCH}$"):
        recs.consume_token(hash_secret(secret), NOW)
    late, late_secret = new_token(req, "1H", _sealer().seal, NOW)
    recs.add_token(late)
    with pytest.raises(Forbidden, match=f"^{EXPIRED}$"):
        recs.consume_token(hash_secret(late_secret), NOW + timedelta(hours=2))
    assert recs.tokens() == []  # the expired token is gone too


@pytest.mark.parametrize("expression, delta", [("30S", timedelta(seconds=30)), ("1H 30M", timedelta(minutes=90)),
                                               ("2d", timedelta(days=2)), ("1w", timedelta(weeks=1))])
def test_expiry_expressions(expression: str, delta: timedelta) -> None:
    assert expires_at(expression, NOW) == NOW + delta


def test_calendar_expiry_and_bad_expressions() -> None:
    assert expires_at("1m", NOW) == datetime(2026, 2, 28, 12, 0, tzinfo=timezone.utc)  # 31 Jan + 1 month
    assert expires_at("1y", NOW).year == 2027 and expires_at("", NOW) is None
    for bad in ("soon", "1x", "-1H", "1 H"):
        with pytest.raises(BadRequest, match="Invalid expiry expression"):
            expires_at(bad, NOW)


def test_certificates_added_once_and_found_by_prefix(pem: tuple[str, str]) -> None:
    recs = ServerRecords(origin="m")
    material = certs.load(pem[0])
    cert = Certificate(certs.fingerprint(material), "c", "client", certs.to_pem(material))
    recs.add_certificate(cert)
    with pytest.raises(BadRequest, match="already trusted"):
        recs.add_certificate(cert)
    assert recs.find_certificate(cert.fingerprint[:8]) == cert
    with pytest.raises(ApiError, match="Certificate not found"):
        recs.find_certificate("")


def test_state_machine_reports_errors_as_status() -> None:
    machine = StateMachine()
    assert machine.mutate("delete_project", ("default",))[:2] == (403, "The 'default' project cannot be deleted")
    assert machine.mutate("_private", ())[0] == 400
    status, _, out = machine.mutate("create_project", (Project("p1"),))
    assert status == 0 and out[0]["key"] == "p1"
    assert StateMachine(machine.dump()).records.project("p1") is not None  # what the KV store keeps


# ---- sealing and the cluster certificate -------------------------------------------------------------

def test_sealed_values_open_only_with_the_same_secret() -> None:
    sealed = Sealer(b"one", "x").seal("secret")
    assert "secret" not in sealed and Sealer(b"one", "x").open(sealed) == "secret"
    for other in (Sealer(b"two", "x"), Sealer(b"one", "y")):
        with pytest.raises(SealError):
            other.open(sealed)


class DictKV:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> bool:
        if key in self.data:
            return False
        self.data[key] = value
        return True


def test_cluster_certificate_generated_once_then_fetched(tmp_path: Path) -> None:
    kv = DictKV()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = cluster_cert.ensure(tmp_path / "a", kv, "ray-token")
    assert first.key_pem.encode() not in kv.data[cluster_cert.KV_KEY]  # sealed in the KV store
    joined = cluster_cert.ensure(tmp_path / "b", kv, "ray-token")  # no files yet: fetched and opened
    assert (joined.cert_pem, joined.key_pem) == (first.cert_pem, first.key_pem)
    assert oct((tmp_path / "b" / "cluster.key").stat().st_mode & 0o777) == "0o600"
    (tmp_path / "c").mkdir()
    with pytest.raises(cluster_cert.ClusterCertError, match="Ray token"):
        cluster_cert.ensure(tmp_path / "c", kv, "another-token")


def test_cluster_certificate_from_another_cluster_is_refused(tmp_path: Path) -> None:
    cluster_cert.ensure(tmp_path, DictKV(), "t")
    with pytest.raises(cluster_cert.ClusterCertError, match="not this cluster's certificate"):
        cluster_cert.ensure(tmp_path, _published_elsewhere(), "t")


def _published_elsewhere() -> DictKV:
    kv = DictKV()
    kv.put(cluster_cert.KV_CERT, certs.generate("other")[0].encode())
    return kv


def test_after_a_head_restart_the_members_copy_is_published_again(tmp_path: Path) -> None:
    first = cluster_cert.ensure(tmp_path, DictKV(), "t")
    fresh = DictKV()  # a new GCS: the member republishes what it keeps
    again = cluster_cert.ensure(tmp_path, fresh, "t")
    assert again.cert_pem == first.cert_pem and fresh.get(cluster_cert.KV_CERT) == first.cert_pem.encode()


# ---- projects ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("", "Missing project name"), ("a/b", "slashes"), ("a b", "spaces"),
                                        ("a_b", "underscores"), (".hidden", "Invalid project name"),
                                        ("x" * 64, "Invalid project name")])
def test_project_names(name: str, text: str) -> None:
    with pytest.raises(BadRequest, match=text):
        projects.validate_name(name)


def test_project_config_keys() -> None:
    assert projects.validate_config({"features.images": "false", "user.team": "ci"})
    with pytest.raises(BadRequest, match="Invalid project configuration key"):
        projects.validate_config({"limits.memory": "1GB"})
