"""Remote access as users elsewhere have it: the unmodified ``lxc`` client and pylxd over HTTPS with
client certificates, trust tokens, the trust store, and who gets refused."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import os
import pty
import shutil
import signal
import ssl
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from core import certs
from tests.conftest import ADMIN_GID, Broker, read_pty, wait_for
from tests.remotes import CLIENT_UID, Remote, enable_https, issue_token
from tests.wsutil import Raw

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(shutil.which("lxc") is None, reason="lxd-client not installed (make test installs it)")]


@pytest.fixture(scope="module")
def https(broker: Broker) -> Iterator[str]:
    address = enable_https(broker)
    yield address
    broker.lxc("config", "unset", "core.https_address")


@pytest.fixture()
def remote(broker: Broker, https: str) -> Iterator[Remote]:
    """A client trusted by token as ``eb``; its certificate is removed from the trust store after."""
    client = Remote()
    r = client.add("eb", issue_token(broker, f"t{os.getpid()}-{time.monotonic_ns()}"))
    assert r.returncode == 0, r.stderr
    try:
        yield client
    finally:
        broker.lxc("config", "trust", "remove", client.fingerprint())
        client.remove()


def test_remote_add_exec_and_list(broker: Broker, remote: Remote, c1: str) -> None:
    r = remote.lxc("exec", f"eb:{c1}", "--", "sh", "-c", "echo hi; exit 3")
    assert (r.returncode, r.stdout) == (3, b"hi\n"), r.stderr
    listed = remote.lxc("list", "eb:", "--format", "csv", "-c", "ns")
    assert f"{c1},RUNNING" in listed.stdout.decode(), listed.stderr
    trust = broker.lxc("config", "trust", "list", "--format", "csv").stdout.decode()
    assert remote.fingerprint()[:12] in trust


def test_binary_exact_both_ways(remote: Remote, c1: str) -> None:
    data = os.urandom(4 << 20)
    r = remote.lxc("exec", f"eb:{c1}", "--", "cat", input=data)
    assert r.returncode == 0 and hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()


def test_token_works_once(broker: Broker, https: str) -> None:
    token = issue_token(broker, "once")
    first, second = Remote(), Remote()
    try:
        assert first.add("eb", token).returncode == 0
        again = second.add("eb", token)
        assert again.returncode != 0 and b"No matching certificate add operation found" in again.stderr
    finally:
        broker.lxc("config", "trust", "remove", first.fingerprint())
        first.remove()
        second.remove()


def test_token_expires(broker: Broker, https: str) -> None:
    assert broker.lxc("config", "set", "core.remote_token_expiry", "1S").returncode == 0
    try:
        token = issue_token(broker, "late")
    finally:
        broker.lxc("config", "unset", "core.remote_token_expiry")
    expires = json.loads(base64.b64decode(token))["expires_at"]
    assert not expires.startswith("0001")
    deadline = time.time() + 1.5
    wait_for(lambda: time.time() > deadline, 5, "the token's expiry")
    late = Remote()
    try:
        r = late.add("eb", token)
        assert r.returncode != 0 and b"Token has expired" in r.stderr, r.stderr
        tokens = broker.lxc("config", "trust", "list-tokens", "--format", "csv").stdout.decode()
        assert "late," not in tokens  # an expired token is gone from the list
    finally:
        late.remove()


def test_revoke_token(broker: Broker, https: str) -> None:
    token = issue_token(broker, "revoked")
    assert broker.lxc("config", "trust", "revoke-token", "revoked").returncode == 0
    client = Remote()
    try:
        r = client.add("eb", token)
        assert r.returncode != 0 and b"No matching certificate add operation found" in r.stderr
    finally:
        client.remove()


def _pty_session(argv: list[str], env: dict[str, str], size: tuple[int, int]) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            user=CLIENT_UID, group=CLIENT_UID, extra_groups=[])
    os.close(slave)
    return proc, master


def test_interactive_with_resize(remote: Remote, c1: str) -> None:
    # each line typed prints the size: the resize travels apart from the keystrokes, so type until it shows
    proc, master = _pty_session(["lxc", "exec", "-t", f"eb:{c1}", "--", "sh", "-c",
                                 "stty size; while read line; do stty size; done; exit 5"], remote.env, (37, 101))
    try:
        assert b"37 101" in read_pty(master, b"37 101", 30)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
        os.kill(proc.pid, signal.SIGWINCH)
        deadline = time.monotonic() + 15
        out = b""
        while b"50 120" not in out and time.monotonic() < deadline and proc.poll() is None:
            os.write(master, b"\n")
            out += read_pty(master, b"50 120", 0.5)
        assert b"50 120" in out
        os.write(master, b"\x04")  # end of input: the loop ends
        assert proc.wait(30) == 5
    finally:
        proc.kill()
        os.close(master)


def test_removed_client_is_cut_off_at_once(broker: Broker, https: str, c1: str) -> None:
    client = Remote()
    assert client.add("eb", issue_token(broker, "cut")).returncode == 0
    try:
        proc = subprocess.Popen(["lxc", "exec", f"eb:{c1}", "--", "sleep", "1000"], env=client.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, user=CLIENT_UID,
                                group=CLIENT_UID, extra_groups=[])
        try:
            wait_for(lambda: b"sleep 1000" in broker.lxc("exec", c1, "--", "ps").stdout, 30, "the remote command")
            assert broker.lxc("config", "trust", "remove", client.fingerprint()).returncode == 0
            wait_for(lambda: proc.poll() is not None, 10, "the revoked client's exec to end")
            assert proc.returncode != 0
        finally:
            proc.kill()
            proc.wait()
        r = client.lxc("exec", f"eb:{c1}", "--", "true")
        assert r.returncode != 0 and b"not authorized" in r.stderr
        wait_for(lambda: b"sleep 1000" not in broker.lxc("exec", c1, "--", "ps").stdout, 10, "the command killed")
    finally:
        client.remove()


def test_pylxd_with_client_certificate(remote: Remote, https: str, c1: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pylxd

    # requests lets these override the ``verify`` pylxd passes it (and so its pinned fingerprint)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)

    work = Path(tempfile.mkdtemp(prefix="ebpylxd-", dir="/tmp"))
    try:  # pylxd (run by root here) reads copies; the originals belong to the remote's uid
        for src in (remote.cert, remote.key, remote.server_cert("eb")):
            shutil.copy(src, work / src.name)
        client = pylxd.Client(endpoint=f"https://{https}", cert=(str(work / "client.crt"), str(work / "client.key")),
                              verify=str(work / "eb.crt"))
        assert client.trusted
        result = client.instances.get(c1).execute(["sh", "-c", "echo hi; exit 4"])
        assert (result.exit_code, result.stdout) == (4, "hi\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


UNTRUSTED_ROUTES = [
    ("GET", "/1.0/instances"), ("GET", "/1.0/instances/c1"), ("POST", "/1.0/instances/c1/exec"),
    ("GET", "/1.0/operations"), ("GET", "/1.0/certificates"), ("GET", "/1.0/projects"), ("PUT", "/1.0"),
    ("PATCH", "/1.0"), ("DELETE", "/1.0/instances/c1"), ("GET", "/1.0/cluster/members"),
    ("PUT", "/1.0/instances/c1/state"), ("GET", "/1.0/events"), ("GET", "/internal/v1/call"),
    ("GET", "/1.0/metrics"), ("GET", "/1.0/instances/c1/files?path=/etc/hostname"),
    ("POST", "/1.0/instances/c1/files?path=/tmp/x"), ("DELETE", "/1.0/instances/c1/files?path=/etc/hostname"),
]


@pytest.fixture(scope="module")
def stranger() -> Iterator[tuple[str, str]]:
    """A client certificate nobody trusts."""
    work = Path(tempfile.mkdtemp(prefix="ebstranger-", dir="/tmp"))
    cert, key = certs.generate("stranger")
    (work / "c.crt").write_text(cert)
    (work / "c.key").write_text(key)
    yield str(work / "c.crt"), str(work / "c.key")
    shutil.rmtree(work, ignore_errors=True)


def _client_context(cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # who the server is does not matter here
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def test_unknown_certificate_reads_only_the_server(https: str, stranger: tuple[str, str]) -> None:
    with httpx.Client(base_url=f"https://{https}", verify=_client_context(stranger), timeout=10) as c:
        server = c.get("/1.0").json()["metadata"]
        assert server["auth"] == "untrusted" and "environment" not in server
        for method, path in UNTRUSTED_ROUTES:
            r = c.request(method, path, content=b"{}")
            assert (r.status_code, r.json()["error"]) == (403, "not authorized"), (method, path)
        r = c.post("/1.0/certificates", json={"password": "bm90IGEgdG9rZW4="})
        assert r.status_code == 403


async def test_unknown_certificate_gets_no_websocket(https: str, stranger: tuple[str, str]) -> None:
    with pytest.raises(InvalidStatus) as exc:
        await ws_connect(f"wss://{https}/1.0/events", ssl=_client_context(stranger))
    assert exc.value.response.status_code == 403


def test_no_client_certificate_at_all(https: str) -> None:
    with httpx.Client(base_url=f"https://{https}", verify=_client_context(None), timeout=10) as c:
        assert c.get("/1.0").json()["metadata"]["auth"] == "untrusted"
        assert c.get("/1.0/instances").status_code == 403


def test_server_certificate_is_the_clusters(broker: Broker, remote: Remote) -> None:
    """What the client pinned is the certificate every member presents, and GET /1.0 says so."""
    server = json.loads(remote.lxc("query", "eb:/1.0").stdout)
    pinned = remote.server_cert("eb").read_text()
    assert server["environment"]["certificate"].strip() == pinned.strip()
    assert server["auth"] == "trusted" and server["auth_user_method"] == "tls"
    assert server["auth_user_name"] == remote.fingerprint()


# A request over the unix socket by another uid, with the system Python (the venv's lives under /root).
_AS_OTHER_UID = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"GET " + sys.argv[2].encode() + b" HTTP/1.1\\r\\nHost: eb\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
doc = json.loads(body)
print(head.split()[1].decode(), doc["error"] or doc["metadata"]["auth_user_name"])
"""


def _as_other_uid(broker: Broker, path: str, extra_groups: list[int]) -> str:
    out = subprocess.run(["/usr/bin/python3", "-c", _AS_OTHER_UID, str(broker.socket), path], capture_output=True,
                         text=True, user=CLIENT_UID, group=CLIENT_UID, extra_groups=extra_groups, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_unix_socket_refuses_a_uid_outside_the_group(broker: Broker) -> None:
    """uid 65534 let through to the socket with ACLs (never opened to every user): a clear 403."""
    entries = [(broker.base, "x"), (broker.socket, "rw")]
    for path, perms in entries:
        subprocess.run(["setfacl", "-m", f"u:{CLIENT_UID}:{perms}", str(path)], check=True)
    try:
        assert _as_other_uid(broker, "/1.0/instances", []) == (
            "403 not authorized: uid 65534 is neither root nor a member of the execbroker group")
    finally:
        for path, _ in entries:
            subprocess.run(["setfacl", "-x", f"u:{CLIENT_UID}", str(path)], check=False)


def test_unix_socket_admits_the_group(broker: Broker) -> None:
    assert _as_other_uid(broker, "/1.0", [ADMIN_GID]) == "200 nobody"


async def test_tls_handshake_deadline(https: str) -> None:
    """A TCP connection that never starts its TLS handshake is closed by the server."""
    host, port = https.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        assert await asyncio.wait_for(reader.read(1), 30) == b""
    finally:
        writer.close()


def test_trust_show_and_edit(broker: Broker, remote: Remote) -> None:
    fingerprint = remote.fingerprint()
    shown = broker.lxc("config", "trust", "show", fingerprint[:12])
    assert shown.returncode == 0 and f"fingerprint: {fingerprint}" in shown.stdout.decode(), shown.stderr
    edited = shown.stdout.decode().replace("restricted: false", "restricted: true")
    assert broker.lxc("config", "trust", "edit", fingerprint[:12], input=edited.encode()).returncode == 0
    r = remote.lxc("list", "eb:")  # restricted to no project at all now
    assert r.returncode != 0 and b"User does not have permission" in r.stderr, r.stderr
    r = broker.lxc("config", "trust", "show", "ffff")
    assert r.returncode != 0 and b"Certificate not found" in r.stderr


def test_files_over_https(remote: Remote, c1: str) -> None:
    """lxc file push and pull through an HTTPS remote, as another uid."""
    work = Path(tempfile.mkdtemp(prefix="ebfiles-", dir="/tmp"))
    try:
        os.chown(work, CLIENT_UID, CLIENT_UID)
        src = work / "payload"
        src.write_bytes(os.urandom(3 << 20))
        os.chown(src, CLIENT_UID, CLIENT_UID)
        r = subprocess.run(["lxc", "file", "push", "-q", str(src), f"eb:{c1}/tmp/payload"], env=remote.env,
                           capture_output=True, timeout=60, user=CLIENT_UID, group=CLIENT_UID, extra_groups=[])
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["lxc", "file", "pull", f"eb:{c1}/tmp/payload", "-"], env=remote.env,
                           capture_output=True, timeout=60, user=CLIENT_UID, group=CLIENT_UID, extra_groups=[])
        assert r.returncode == 0 and r.stdout == src.read_bytes(), r.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_metrics_certificate_reads_metrics_only(broker: Broker, https: str, stranger: tuple[str, str]) -> None:
    """A certificate of type ``metrics`` may scrape /1.0/metrics and nothing else (as Incus)."""
    pem = Path(stranger[0]).read_text()
    der = base64.b64encode(ssl.PEM_cert_to_DER_cert(pem)).decode()
    broker.api("POST", "/1.0/certificates", {"type": "metrics", "name": "scraper", "certificate": der}, status=200)
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    try:
        with httpx.Client(base_url=f"https://{https}", verify=_client_context(stranger), timeout=10) as c:
            r = c.get("/1.0/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
            assert "lxd_procs_total" in r.text and r.text.endswith("# EOF\n")
            for method, path in (("GET", "/1.0/instances"), ("GET", "/1.0/instances/c1/files?path=/etc/hostname"),
                                 ("POST", "/1.0/instances/c1/exec"), ("GET", "/1.0/certificates")):
                assert c.request(method, path, content=b"{}").status_code == 403, (method, path)
    finally:
        broker.api("DELETE", f"/1.0/certificates/{fingerprint}", status=200)


async def test_another_identity_cannot_attach(broker: Broker, remote: Remote, c1: str, https: str) -> None:
    """A detachable exec started over the unix socket is not rejoined by a certificate (403)."""
    raw = Raw(broker.socket)
    op = await raw.exec_op(c1, ["sleep", "20"], detachable=True)
    try:
        secret = op["metadata"]["fds"]["1"]
        ctx = _client_context((str(remote.cert), str(remote.key)))
        with pytest.raises(InvalidStatus) as exc:
            await ws_connect(f"wss://{https}/1.0/operations/{op['id']}/websocket?secret={secret}&offset=0", ssl=ctx)
        assert exc.value.response.status_code == 403
        assert json.loads(exc.value.response.body or b"{}")["error"] == "Requestor mismatch"
    finally:
        async with raw.client() as c:
            await c.delete(f"/1.0/operations/{op['id']}")
