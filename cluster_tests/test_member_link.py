"""One persistent member link per pair of members (broker/mux.py): forwarded execs, through the real
`lxc` client and task mode, dial nothing new once the members have a link; every call, relayed socket
and event batch of theirs rides the links that are already up."""

from __future__ import annotations

import os
import re
import signal
import uuid

from cluster_tests.conftest import Cluster
from cluster_tests.test_agent_loss import agent_pid
from tests.conftest import Endpoint, members_online, wait_for

DIALS = re.compile(r"^execbroker_member_link_dials_total (\S+)$", re.M)
LINKS = re.compile(r"^execbroker_member_links (\S+)$", re.M)


def figure(ep: Endpoint, pattern: re.Pattern[str]) -> float:
    with ep.http() as c:
        r = c.get("/1.0/metrics")
    assert r.status_code == 200, r.text
    m = pattern.search(r.text)
    assert m is not None, "the member-link series is missing"
    return float(m.group(1))


def test_forwarded_execs_dial_nothing_new(cluster: Cluster) -> None:
    members = [cluster.node(k) for k in (1, 2, 3)]
    via, owner = cluster.node(1), cluster.node(3)  # ic lives on node3
    r = via.lxc("exec", "ic", "--", "true")  # the pair's link is up from here on (it may be up already)
    assert r.returncode == 0, r.stderr
    dials = [figure(ep, DIALS) for ep in members]
    for i in range(10):
        r = via.lxc("exec", "ic", "--", "sh", "-c", f"echo out{i}; echo err{i} >&2; exit {i}")
        assert (r.returncode, r.stdout, r.stderr) == (i, f"out{i}\n".encode(), f"err{i}\n".encode())
        op = via.api("POST", "/1.0/instances/ic/exec", {"command": ["true"], "wait-for-websocket": False})
        assert via.wait_op(op["operation"])["metadata"]["return"] == 0
    assert [figure(ep, DIALS) for ep in members] == dials, "a forwarded exec dialled a member"
    assert figure(via, LINKS) >= 1 and figure(owner, LINKS) >= 1


def test_a_member_that_never_heard_of_an_operation_finds_its_owner(cluster: Cluster) -> None:
    """Operations are not in the directory: node2's agent restarts (forgetting every event it got), and
    it still serves an operation running on node3 by asking its peers over the links."""
    owner, other = cluster.node(3), cluster.node(2)
    flag = f"/tmp/member-link-{uuid.uuid4().hex}"
    op = owner.api("POST", "/1.0/instances/ic/exec",
                   {"command": ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.1; done"]}, status=202)["metadata"]
    try:
        old = agent_pid(other)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: agent_pid(other) not in (None, old) and members_online(other, 3), 90,
                 "node2's new agent serving", interval=0.2)
        seen = other.api("GET", f"/1.0/operations/{op['id']}", status=200)["metadata"]
        assert (seen["id"], seen["status"], seen["location"]) == (op["id"], "Running", "node3")
    finally:
        owner.api("POST", "/1.0/instances/ic/exec", {"command": ["touch", flag]}, status=202)
    final = other.wait_op(f"/1.0/operations/{op['id']}")
    assert (final["status"], final["metadata"]["return"]) == ("Success", 0)
