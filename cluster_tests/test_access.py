"""Trust across a 3-node cluster: one trust store for every member, a restricted certificate confined
through a member that does not own the instance, revocation reaching every member, and a member
listener that lets only members in."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_tests.conftest import Cluster, _members_online
from core import certs
from tests.conftest import wait_for
from tests.remotes import CLIENT_UID, Remote, enable_https, issue_token

pytestmark = pytest.mark.skipif(shutil.which("lxc") is None, reason="lxd-client not installed")
PROJECT = "pc"


@pytest.fixture(scope="module")
def https(cluster: Cluster) -> Iterator[dict[int, str]]:
    """HTTPS on node1 and node2 (node3, which owns the instances, serves none)."""
    addresses = {k: enable_https(cluster.node(k)) for k in (1, 2)}
    yield addresses
    for k in addresses:
        cluster.node(k).lxc("config", "unset", "core.https_address")


@pytest.fixture(scope="module")
def confined(cluster: Cluster, https: dict[int, str]) -> Iterator[Remote]:
    """A client restricted to project pc, whose instance pc1 lives on node3; the client talks to node1."""
    ep = cluster.node(1)
    assert ep.lxc("project", "create", PROJECT).returncode == 0
    op = ep.api("POST", f"/1.0/instances?target=node3&project={PROJECT}",
                {"name": "pc1", "source": {"type": "image", "alias": "busybox"}, "start": True}, status=202)
    assert ep.wait_op(op["operation"], 60)["status"] == "Success"
    client = Remote()
    assert client.add("n1", issue_token(ep, "confined", "--restricted", "--projects", PROJECT)).returncode == 0
    yield client
    ep.lxc("config", "trust", "remove", client.fingerprint())
    client.remove()
    for args in (("stop", "--force", "pc1"), ("delete", "pc1")):
        ep.lxc("--project", PROJECT, *args)
    ep.lxc("project", "delete", PROJECT)


def test_confined_through_a_member_that_does_not_own_the_instance(cluster: Cluster, confined: Remote) -> None:
    info = json.loads(confined.lxc("query", f"n1:/1.0/instances/pc1?project={PROJECT}").stdout)
    assert info["location"] == "node3"
    r = confined.lxc("exec", "n1:pc1", "--", "sh", "-c", "hostname; exit 4")  # forwarded node1 -> node3
    assert (r.returncode, r.stdout) == (4, b"pc1\n"), r.stderr
    listed = confined.lxc("list", "n1:", "--format", "csv", "-c", "nL").stdout.decode().split()
    assert listed == ["pc1,node3"]
    # ic: default project, on node3: forbidden as a project, not found under the client's own
    r = confined.lxc("--project", "default", "exec", "n1:ic", "--", "true")
    assert r.returncode != 0 and b'User does not have permission for project "default"' in r.stderr
    r = confined.lxc("query", f"n1:/1.0/instances/ic?project={PROJECT}")
    assert r.returncode != 0 and b"Instance not found" in r.stderr
    ops = json.loads(confined.lxc("query", f"n1:/1.0/operations?project={PROJECT}&recursion=1").stdout)
    assert all(op["class"] != "token" for group in ops.values() for op in group)


def test_one_trust_store_for_every_member(cluster: Cluster, confined: Remote) -> None:
    fingerprint = confined.fingerprint()[:12]
    for k in (1, 2, 3):
        wait_for(lambda k=k: fingerprint in cluster.node(k).lxc("config", "trust", "list", "--format", "csv")
                 .stdout.decode(), 10, f"node{k} to list the certificate")


def test_revocation_reaches_every_member_and_its_open_sockets(cluster: Cluster, https: dict[int, str]) -> None:
    ep1, ep2 = cluster.node(1), cluster.node(2)
    client = Remote()
    try:
        assert client.add("n2", issue_token(ep1, "revoked-everywhere")).returncode == 0  # token from node1
        proc = subprocess.Popen(["lxc", "exec", "n2:ic", "--", "sleep", "1000"], env=client.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, user=CLIENT_UID,
                                group=CLIENT_UID, extra_groups=[])
        try:
            wait_for(lambda: b"sleep 1000" in ep2.lxc("exec", "ic", "--", "ps").stdout, 30, "the command")
            wait_for(lambda: client.fingerprint()[:12] in ep1.lxc("config", "trust", "list", "--format", "csv")
                     .stdout.decode(), 10, "node1 to have the certificate node2 added")
            assert ep1.lxc("config", "trust", "remove", client.fingerprint()).returncode == 0  # on node1
            wait_for(lambda: proc.poll() is not None, 10, "the exec through node2 to end")
        finally:
            proc.kill()
            proc.wait()
        r = client.lxc("list", "n2:")
        assert r.returncode != 0 and b"not authorized" in r.stderr
    finally:
        client.remove()


def test_trust_store_survives_a_member_restart(cluster: Cluster, https: dict[int, str]) -> None:
    ep1 = cluster.node(1)
    client = Remote()
    try:
        assert client.add("n1", issue_token(ep1, "survivor")).returncode == 0
        cluster.script("node", "2", str(cluster.base))
        wait_for(lambda: _members_online(ep1, 3), 60, "node2 back")
        listed = cluster.node(2).lxc("config", "trust", "list", "--format", "csv").stdout.decode()
        assert client.fingerprint()[:12] in listed
        r = client.lxc("remote", "add", "n2", f"https://{https[2]}", "--accept-certificate")
        assert r.returncode == 0, r.stderr  # node2 serves HTTPS again (its address is kept) and trusts it
        r = client.lxc("exec", "n2:ic", "--", "hostname")
        assert (r.returncode, r.stdout) == (0, b"ic\n"), r.stderr
    finally:
        ep1.lxc("config", "trust", "remove", client.fingerprint())
        client.remove()


def _member_address(cluster: Cluster, k: int) -> tuple[str, int]:
    url = cluster.node(1).api("GET", f"/1.0/cluster/members/node{k}")["metadata"]["url"]
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("client_cert", ["none", "stranger"])
def test_member_listener_refuses_non_members(cluster: Cluster, client_cert: str) -> None:
    """No HTTP answer of any kind without the cluster certificate: the handshake is where it ends."""
    host, port = _member_address(cluster, 2)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    work = Path(tempfile.mkdtemp(prefix="ebstranger-", dir="/tmp"))
    try:
        if client_cert == "stranger":
            cert, key = certs.generate("stranger")
            (work / "c.crt").write_text(cert)
            (work / "c.key").write_text(key)
            ctx.load_cert_chain(work / "c.crt", work / "c.key")
        with socket.create_connection((host, port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"GET /1.0 HTTP/1.1\r\nHost: m\r\n\r\n")
                    answer = tls.recv(4096)
            except (ssl.SSLError, ConnectionError):
                answer = b""
        assert answer == b""
    finally:
        shutil.rmtree(work, ignore_errors=True)
