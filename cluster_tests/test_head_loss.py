"""Losing the head's Ray processes (issue 12, head loss): the head keeps Ray's cluster state in its own
Redis (`execbroker up --redis local`, what deploy/local-cluster.sh starts when redis-server is
installed). While the head is gone the other members go on serving exec on their own instances; when
it returns, forwarding, the directory, the member table and the trust store are all there again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from cluster_tests.conftest import Cluster, _members_online
from bench.harness import children
from tests.conftest import wait_for


def _ray_start_child(up_pid: int) -> int:
    """The head's `ray start` child: its process group holds the GCS, the raylet and their workers."""
    for pid, cmd in children(up_pid):
        if b"ray\0start" in cmd.replace(b"/ray\0", b"ray\0"):
            return pid
    raise AssertionError(f"no `ray start` child of {up_pid}")


@pytest.mark.timeout(600)
def test_head_loss_and_return(cluster: Cluster) -> None:
    head, member = cluster.node(1), cluster.node(3)
    if not (head.data_dir / "gcs-redis").is_dir():
        pytest.fail("the head runs without a GCS store: redis-server missing (deploy/system-deps.sh installs it)")
    token = head.lxc("config", "trust", "add", "--name", "survives-head-loss")
    assert token.returncode == 0, token.stderr
    try:
        _head_loss_and_return(cluster, head, member)
    finally:
        head.lxc("config", "trust", "revoke-token", "survives-head-loss")


def _head_loss_and_return(cluster: Cluster, head, member) -> None:  # type: ignore[no-untyped-def]
    up_pid = int((head.data_dir / "up.pid").read_text())
    os.killpg(_ray_start_child(up_pid), signal.SIGKILL)
    lost = time.monotonic()

    # the head's broker sees its Ray node gone and exits; meanwhile node3 serves its own instance
    served = 0
    while _alive(up_pid) or served < 5:
        r = member.lxc("exec", "ic", "--", "echo", "still")
        assert (r.returncode, r.stdout) == (0, b"still\n"), r.stderr
        served += 1
        assert time.monotonic() - lost < 60, "the head's broker did not exit after its Ray node died"

    cluster.script("node", "1", str(cluster.base))
    back = time.monotonic() - lost
    wait_for(lambda: all(_members_online(cluster.node(k), 3) for k in (1, 2, 3)), 60, "3 members online everywhere")

    def forwarding() -> bool:
        a = head.lxc("exec", "ic", "--", "hostname")
        b = member.lxc("exec", "ia", "--", "hostname")
        return (a.returncode, a.stdout, b.returncode, b.stdout) == (0, b"ic\n", 0, b"ia\n")

    wait_for(forwarding, 60, "forwarding both ways after the head returned", interval=0.5)
    forwarded = time.monotonic() - lost
    for k in (1, 2, 3):
        listed = {i["name"]: i["location"] for i in cluster.node(k).api("GET", "/1.0/instances?recursion=1")["metadata"]}
        assert listed.get("ia") == "node1" and listed.get("ic") == "node3", (k, listed)
        tokens = cluster.node(k).lxc("config", "trust", "list-tokens", "--format", "csv").stdout.decode()
        assert "survives-head-loss" in tokens, (k, tokens)
    print(f"\nhead loss: node3 served {served} execs while the head was down; head back after {back:.1f} s, "
          f"forwarding back after {forwarded:.1f} s; trust store, directory and member table intact")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
