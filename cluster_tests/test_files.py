"""Instance files and metrics across members: any member relays a file request to the owner, bodies
streamed both ways; ``lxc monitor`` on one member sees the file events of another; ``?target=`` metrics."""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cluster_tests.conftest import Cluster
from tests.conftest import Endpoint, wait_for

INSTANCE = "ic"  # on node3


def test_push_pull_through_any_member(via: Endpoint, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(20 << 20))
    r = via.lxc("file", "push", "-q", "--uid", "12", "--mode", "0600", str(src), f"{INSTANCE}/tmp/blob")
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    r = via.lxc("file", "pull", "-q", f"{INSTANCE}/tmp/blob", str(back))
    assert r.returncode == 0, r.stderr
    assert hashlib.md5(back.read_bytes()).digest() == hashlib.md5(src.read_bytes()).digest()
    assert (back.stat().st_mode & 0o777) == 0o600
    with via.http() as c:
        r = c.head(f"/1.0/instances/{INSTANCE}/files", params={"path": "/tmp/blob"})
        assert (r.headers["X-LXD-uid"], r.headers["X-LXD-mode"]) == ("12", "0600")
        r = c.get(f"/1.0/instances/{INSTANCE}/files", params={"path": "/no/such"})
        assert r.status_code == 404 and r.json()["error_code"] == 404  # the owner's error, as it sent it
        r = c.post(f"/1.0/instances/{INSTANCE}/files", params={"path": "/tmp/x"}, headers={"X-LXD-type": "fifo"})
        assert r.status_code == 400 and r.json()["error"] == "Bad file type: fifo"
    r = via.lxc("file", "delete", f"{INSTANCE}/tmp/blob")
    assert r.returncode == 0, r.stderr


def test_recursive_push_through_another_member(cluster: Cluster, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("deep\n")
    node1 = cluster.node(1)
    r = node1.lxc("file", "push", "-q", "-p", "-r", str(tree), f"{INSTANCE}/opt/tree/")
    assert r.returncode == 0, r.stderr
    r = cluster.node(3).lxc("exec", INSTANCE, "--", "cat", "/opt/tree/t/a/b/f")
    assert r.stdout == b"deep\n", r.stderr
    assert cluster.node(3).lxc("exec", INSTANCE, "--", "rm", "-r", "/opt/tree").returncode == 0


def test_monitor_sees_file_events_of_another_member(cluster: Cluster) -> None:
    """lxc monitor on node1; the push goes straight to node3, the owner, where the event originates."""
    monitor = subprocess.Popen(["lxc", "monitor", "--type=lifecycle", "--format=json"], env=cluster.node(1).env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict[str, Any]] = []

    def push_and_look() -> bool:
        """One push, then what the monitor printed meanwhile (it may connect after the first pushes)."""
        with cluster.node(3).http() as c:
            assert c.post(f"/1.0/instances/{INSTANCE}/files", params={"path": "/tmp/ev"}, content=b"e").status_code == 200
        assert monitor.stdout is not None
        while select.select([monitor.stdout], [], [], 0.3)[0]:
            seen.append(json.loads(monitor.stdout.readline()))
        return any(e["metadata"]["action"] == "instance-file-pushed" for e in seen)

    try:
        wait_for(push_and_look, 30, "node3's instance-file-pushed on node1's lxc monitor")
    finally:
        monitor.kill()
        monitor.wait()
    event = next(e for e in seen if e["metadata"]["action"] == "instance-file-pushed")
    assert event["location"] == "node3" and event["metadata"]["context"] == {"path": "/tmp/ev"}
    assert event["metadata"]["source"] == f"/1.0/instances/{INSTANCE}"


def test_metrics_of_a_target_member(cluster: Cluster) -> None:
    with cluster.node(1).http() as c:
        local = c.get("/1.0/metrics").text
        remote = c.get("/1.0/metrics", params={"target": "node3"})
        missing = c.get("/1.0/metrics", params={"target": "node9"})
    assert remote.status_code == 200 and missing.status_code == 404

    def names(text: str) -> set[str]:
        return {s.labels.get("name", "") for f in text_string_to_metric_families(text) for s in f.samples
                if f.name == "lxd_procs_total"}
    assert names(local) == {"ia"} and names(remote.text) == {INSTANCE}  # each member serves its own
