"""Instance files through the unmodified ``lxc`` 5.0.2 and raw HTTP: push and pull, trees, append,
delete, edit, symlinks that try to leave the instance, ownership through the id map, bounded memory,
the lifecycle events, and the errors."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import unix_connect

from tests.conftest import Broker, wait_for

pytestmark = pytest.mark.broker
NAME = "files1"


@pytest.fixture(scope="module")
def inst(broker: Broker) -> Iterator[str]:
    broker.launch(NAME)
    try:
        yield NAME
    finally:
        broker.remove(NAME)


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def inside(broker: Broker, inst: str, script: str) -> str:
    r = broker.lxc("exec", inst, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def id_base(broker: Broker, inst: str) -> int:
    return int(inside(broker, inst, "cat /proc/self/uid_map").split()[1])


def test_push_pull_50_mib_exact(broker: Broker, inst: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(50 << 20))
    r = broker.lxc("file", "push", "-q", str(src), f"{inst}/root/")
    assert r.returncode == 0, r.stderr
    assert inside(broker, inst, "md5sum /root/src.bin").split()[0] == md5(src)
    dst = tmp_path / "back.bin"
    r = broker.lxc("file", "pull", "-q", f"{inst}/root/src.bin", str(dst))
    assert r.returncode == 0, r.stderr
    assert md5(dst) == md5(src)
    inside(broker, inst, "rm /root/src.bin")


def test_pushed_file_belongs_to_the_instance(broker: Broker, inst: str, tmp_path: Path) -> None:
    """Ownership goes through the id map: uid 1000 inside is id_base+1000 on the host, never host 1000."""
    src = tmp_path / "owned"
    src.write_text("mine\n")
    r = broker.lxc("file", "push", "-q", "--uid", "1000", "--gid", "1001", "--mode", "0640", str(src),
                   f"{inst}/tmp/owned")
    assert r.returncode == 0, r.stderr
    assert inside(broker, inst, "stat -c '%u %g %a' /tmp/owned").split() == ["1000", "1001", "640"]
    host = broker.data_dir / "instances" / inst / "rootfs" / "tmp" / "owned"
    st = host.stat()
    base = id_base(broker, inst)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (base + 1000, base + 1001, 0o640)
    with broker.http() as c:
        r = c.get(f"/1.0/instances/{inst}/files", params={"path": "/tmp/owned"})
    assert r.status_code == 200 and r.content == b"mine\n"
    for prefix in ("X-LXD-", "X-Incus-"):
        assert (r.headers[prefix + "uid"], r.headers[prefix + "gid"], r.headers[prefix + "mode"],
                r.headers[prefix + "type"]) == ("1000", "1001", "0640", "file")
        assert r.headers[prefix + "modified"].endswith(" +0000 UTC")  # as LXD writes it
    assert r.headers["Last-Modified"].endswith(" GMT")


def test_recursive_push_and_pull_keep_modes_and_owners(broker: Broker, inst: str, tmp_path: Path) -> None:
    tree = tmp_path / "app"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "run").write_text("#!/bin/sh\necho ran\n")
    (tree / "bin" / "run").chmod(0o750)
    (tree / "conf").mkdir(mode=0o700)
    (tree / "conf" / "secret").write_text("s3cret\n")
    os.chown(tree / "conf" / "secret", 1234, 4321)
    (tree / "latest").symlink_to("bin/run")
    r = broker.lxc("file", "push", "-q", "-p", "-r", str(tree), f"{inst}/opt/deep/er/")
    assert r.returncode == 0, r.stderr
    listing = inside(broker, inst, "cd /opt/deep/er/app && stat -c '%n %u %g %a %F' bin bin/run conf conf/secret"
                                   " latest && readlink latest && ./bin/run")
    rows = listing.splitlines()
    assert rows[1] == "bin/run 0 0 750 regular file"
    assert rows[2] == "conf 0 0 700 directory"
    assert rows[3] == "conf/secret 1234 4321 644 regular file"
    assert rows[4].startswith("latest ") and rows[4].endswith("symbolic link")
    assert rows[5:] == ["bin/run", "ran"]
    out = tmp_path / "pulled"
    out.mkdir()
    r = broker.lxc("file", "pull", "-q", "-r", f"{inst}/opt/deep/er/app", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "app" / "conf" / "secret").read_text() == "s3cret\n"
    assert stat.S_IMODE((out / "app" / "bin" / "run").stat().st_mode) == 0o750
    assert os.readlink(out / "app" / "latest") == "/opt/deep/er/app/bin/run"  # made absolute, as LXD does
    inside(broker, inst, "rm -r /opt/deep")


def test_append_delete_and_edit(broker: Broker, inst: str, tmp_path: Path) -> None:
    with broker.http() as c:
        assert c.post(f"/1.0/instances/{inst}/files", params={"path": "/tmp/log"}, content=b"one\n").status_code == 200
        r = c.post(f"/1.0/instances/{inst}/files", params={"path": "/tmp/log"}, content=b"two\n",
                   headers={"X-Incus-write": "append"})
        assert r.status_code == 200, r.text
    assert inside(broker, inst, "cat /tmp/log") == "one\ntwo\n"
    r = broker.lxc("file", "delete", f"{inst}/tmp/log")
    assert r.returncode == 0, r.stderr
    assert inside(broker, inst, "test -e /tmp/log || echo gone") == "gone\n"
    inside(broker, inst, "echo old > /tmp/motd; chmod 600 /tmp/motd")
    r = broker.lxc("file", "edit", f"{inst}/tmp/motd", input=b"edited\n")  # no terminal: stdin is the new text
    assert r.returncode == 0, r.stderr
    assert inside(broker, inst, "cat /tmp/motd; stat -c %a /tmp/motd") == "edited\n600\n"  # mode kept


def test_missing_paths_and_bad_headers(broker: Broker, inst: str, tmp_path: Path) -> None:
    r = broker.lxc("file", "pull", f"{inst}/no/such/file", str(tmp_path))
    assert r.returncode != 0 and b"No such file or directory" in r.stderr, r
    with broker.http() as c:
        url = f"/1.0/instances/{inst}/files"
        r = c.get(url, params={"path": "/no/such"})
        assert r.status_code == 404 and r.json()["error_code"] == 404
        r = c.post(url, params={"path": "/tmp/x"}, content=b"x", headers={"X-LXD-type": "socket"})
        assert r.status_code == 400 and r.json()["error"] == "Bad file type: socket"
        r = c.post(url, params={"path": "/tmp/x"}, content=b"x", headers={"X-LXD-uid": "root"})
        assert r.status_code == 400 and "uid" in r.json()["error"]
        r = c.post(url, params={"path": "/tmp/x"}, content=b"x", headers={"X-LXD-write": "prepend"})
        assert r.status_code == 400 and r.json()["error"] == "Bad file write mode: prepend"
        r = c.post(url, params={"path": "/tmp/l"}, content=b"t" * 5000, headers={"X-LXD-type": "symlink"})
        assert r.status_code == 400 and r.json()["error"] == "Symlink target too long (limit 4096 bytes)"
        r = c.get(url, params={"path": "/" + "d" * 5000})
        assert r.status_code == 400 and r.json()["error"] == "Invalid path argument"
        assert c.get(url).status_code == 400  # no path
        assert c.get("/1.0/instances/nope/files", params={"path": "/"}).status_code == 404
        r = c.delete(url, params={"path": "/etc"})  # a directory that is not empty
        assert r.status_code == 400 and "not empty" in r.json()["error"]
        r = c.post(url, params={"path": "/proc/sys/kernel/core_pattern"}, content=b"|/tmp/evil")
        assert r.status_code == 403 and r.json()["error_code"] == 403, r.text


def test_symlinks_resolve_inside_the_instance(broker: Broker, inst: str) -> None:
    """Absolute and ``..`` symlinks planted inside lead back into the instance, never to the host's files."""
    inside(broker, inst, "ln -sf /etc/shadow /tmp/to-shadow; ln -sf ../../../../../../../etc/hostname /tmp/up;"
                         " mkdir -p /tmp/d; ln -sfn / /tmp/d/root")
    with broker.http() as c:
        url = f"/1.0/instances/{inst}/files"
        r = c.get(url, params={"path": "/tmp/to-shadow"})  # a symlink is answered as one, not followed
        assert r.headers["X-LXD-type"] == "symlink" and r.content == b"/etc/shadow"
        r = c.get(url, params={"path": "/tmp/d/root/etc/shadow"})  # through a symlinked directory
        assert r.status_code == 404  # busybox has no /etc/shadow: the host's is not reached
        r = c.get(url, params={"path": "/tmp/d/root/etc/hostname"})
        assert r.content == f"{inst}\n".encode()
        r = c.post(url, params={"path": "/tmp/d/root/etc/planted"}, content=b"inside\n")
        assert r.status_code == 200
    assert inside(broker, inst, "cat /etc/planted") == "inside\n"
    assert not Path("/etc/planted").exists()
    r = broker.lxc("file", "pull", f"{inst}/tmp/up", "-")
    assert r.returncode == 0 and r.stdout == f"{inst}\n".encode(), r  # the instance's hostname, not the host's
    inside(broker, inst, "rm -f /etc/planted /tmp/to-shadow /tmp/up; rm -r /tmp/d")


def test_directory_listing(broker: Broker, inst: str) -> None:
    inside(broker, inst, "mkdir -p /tmp/ls && touch /tmp/ls/a /tmp/ls/b && mkdir /tmp/ls/c")
    with broker.http() as c:
        r = c.get(f"/1.0/instances/{inst}/files", params={"path": "tmp/ls"})  # relative: from /
        head = c.head(f"/1.0/instances/{inst}/files", params={"path": "/tmp/ls"})
    assert r.status_code == 200 and r.json()["metadata"] == ["a", "b", "c"]
    assert r.headers["X-LXD-type"] == "directory" and head.headers["X-Incus-type"] == "directory"
    inside(broker, inst, "rm -r /tmp/ls")


def test_files_of_a_stopped_instance(broker: Broker, tmp_path: Path) -> None:
    """Stopped, the agent works on the rootfs itself: lookups stay inside it (openat2 RESOLVE_IN_ROOT),
    ids go through the instance's range, and what is pushed is there when it starts."""
    broker.launch("files-stopped")
    try:
        base = id_base(broker, "files-stopped")
        inside(broker, "files-stopped", "mkdir /tmp/d && ln -s / /tmp/d/root && ln -s /etc/shadow /tmp/shadow")
        op = broker.api("PUT", "/1.0/instances/files-stopped/state", {"action": "stop", "force": True})
        broker.wait_op(op["operation"])
        with broker.http() as c:
            url = "/1.0/instances/files-stopped/files"
            assert c.get(url, params={"path": "/tmp/d/root/etc/shadow"}).status_code == 404  # not the host's
            r = c.get(url, params={"path": "/tmp/shadow"})
            assert r.headers["X-LXD-type"] == "symlink" and r.content == b"/etc/shadow"
            r = c.post(url, params={"path": "/tmp/d/root/etc/planted"}, content=b"while stopped\n",
                       headers={"X-LXD-uid": "33", "X-LXD-gid": "33", "X-LXD-mode": "0600"})
            assert r.status_code == 200, r.text
            r = c.post(url, params={"path": "/tmp/x"}, content=b"x", headers={"X-LXD-uid": "70000"})
            assert r.status_code == 400, r.text  # outside the instance's ids
            r = c.get(url, params={"path": "/etc/planted"})
            assert (r.content, r.headers["X-LXD-uid"], r.headers["X-LXD-mode"]) == (b"while stopped\n", "33", "0600")
        assert not Path("/etc/planted").exists()
        host = broker.data_dir / "instances" / "files-stopped" / "rootfs" / "etc" / "planted"
        assert (host.stat().st_uid, host.stat().st_gid) == (base + 33, base + 33)
        r = broker.lxc("start", "files-stopped")
        assert r.returncode == 0, r.stderr
        assert inside(broker, "files-stopped", "stat -c '%u %a' /etc/planted; cat /etc/planted") == "33 600\nwhile stopped\n"
    finally:
        broker.remove("files-stopped")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_agent_memory_stays_flat_during_a_1_gib_push(broker: Broker, inst: str, tmp_path: Path) -> None:
    pid = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk on this side
    before = _rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib(pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = broker.lxc("file", "push", "-q", str(big), f"{inst}/root/sparse", timeout=300)
    finally:
        done.set()
        sampler.join()
    assert r.returncode == 0, r.stderr
    assert inside(broker, inst, "stat -c %s /root/sparse; rm /root/sparse") == f"{1 << 30}\n"
    assert peak[0] - before < 64 << 10, f"agent RSS grew by {(peak[0] - before) >> 10} MiB during the push"


def test_file_lifecycle_events(broker: Broker, inst: str) -> None:
    with unix_connect(str(broker.socket), "ws://eb/1.0/events?type=lifecycle") as events:
        with broker.http() as c:
            url = f"/1.0/instances/{inst}/files"
            assert c.post(url, params={"path": "/tmp/ev"}, content=b"e").status_code == 200
            assert c.get(url, params={"path": "/tmp/ev"}).status_code == 200
            assert c.delete(url, params={"path": "/tmp/ev"}).status_code == 200
        seen = []
        while len(seen) < 3:
            meta = json.loads(events.recv(timeout=10))["metadata"]
            if meta["action"].startswith("instance-file-"):
                seen.append(meta)
    assert [m["action"] for m in seen] == ["instance-file-pushed", "instance-file-retrieved", "instance-file-deleted"]
    assert all(m["source"] == f"/1.0/instances/{inst}" and m["requestor"]["protocol"] == "unix" for m in seen)
    assert all(m["context"] == {"path": "/tmp/ev"} for m in seen)


def test_pylxd_files(broker: Broker, inst: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pylxd

    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    client = pylxd.Client(endpoint=str(broker.socket))
    instance = client.instances.get(inst)
    instance.files.put("/tmp/py", b"from pylxd\n", mode="0600", uid=7, gid=8)
    assert instance.files.get("/tmp/py") == b"from pylxd\n"
    assert inside(broker, inst, "stat -c '%u %g %a' /tmp/py").split() == ["7", "8", "600"]
    assert instance.files.delete_available()
    instance.files.delete("/tmp/py")
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("deep\n")
    instance.files.recursive_put(str(tree), "/tmp/rput")
    assert inside(broker, inst, "cat /tmp/rput/sub/f; rm -r /tmp/rput") == "deep\n"


def test_special_filesystems_and_odd_names(broker: Broker, inst: str) -> None:
    """/proc and /sys files are refused (the agent's privileges must not apply to them); a name outside
    latin-1 or a far-future mtime still gets a well-formed answer, and no fd is left open."""
    pid = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    before = len(os.listdir(f"/proc/{pid}/fd"))
    with broker.http() as c:
        url = f"/1.0/instances/{inst}/files"
        r = c.post(url, params={"path": "/proc/1/oom_score_adj"}, content=b"-1000")
        assert r.status_code == 403, r.text
        assert c.get(url, params={"path": "/proc/self/status"}).status_code == 403
        assert inside(broker, inst, "cat /sys/devices/system/cpu/online").strip()  # exists, readable inside
        assert c.get(url, params={"path": "/sys/devices/system/cpu/online"}).status_code == 403
        inside(broker, inst, "echo x > '/tmp/文件.txt'; echo y > /run/far; touch -d @300000000000 /run/far")
        r = c.get(url, params={"path": "/tmp/文件.txt"})
        assert r.status_code == 200 and r.content == b"x\n", r.headers
        assert r.headers["Content-Disposition"] == "inline;filename*=UTF-8''%E6%96%87%E4%BB%B6.txt"
        r = c.get(url, params={"path": "/run/far"})
        assert r.status_code == 200 and r.content == b"y\n"
    assert inside(broker, inst, "cat /proc/1/oom_score_adj").strip() != "-1000"
    inside(broker, inst, "rm -f '/tmp/文件.txt' /run/far")
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= before, 10, "the agent's fds back")
