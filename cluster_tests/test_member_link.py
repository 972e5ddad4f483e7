"""One persistent member link per pair of members (broker/mux.py): forwarded execs, through the real
`lxc` client and task mode, dial nothing new once the members have a link; every call, relayed socket
and event batch of theirs rides the links that are already up."""

from __future__ import annotations

import re

from cluster_tests.conftest import Cluster
from tests.conftest import Endpoint

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
