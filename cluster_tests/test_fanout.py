"""Fan-out exec over 30 instances of a 3-node cluster: every member runs its share, the cap holds
cluster-wide, one broken instance is reported without stopping the rest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster_tests.conftest import Cluster
from tests.test_fanout import overlap

NAMES = [f"fo{i:02d}" for i in range(30)]


@pytest.fixture(scope="module")
def fleet(cluster: Cluster) -> Iterator[list[str]]:
    made = []
    try:
        for i, name in enumerate(NAMES):
            cluster.launch(name, f"node{i % 3 + 1}")
            made.append(name)
        yield NAMES
    finally:
        for name in made:
            cluster.remove(name)


def test_fanout_over_the_cluster(cluster: Cluster, fleet: list[str]) -> None:
    node2 = cluster.node(2)
    op = node2.api("PUT", "/1.0/instances/fo07/state", {"action": "stop", "force": True})  # on node2
    node2.wait_op(op["operation"])
    try:
        via = cluster.node(1)
        op = via.api("POST", "/1.0/exec", {"command": ["sh", "-c", "sleep 0.2; hostname; exit ${#HOSTNAME}"],
                                           "instances": fleet, "concurrency": 7}, status=202)
        final = via.wait_op(op["operation"], 120)
    finally:
        op = node2.api("PUT", "/1.0/instances/fo07/state", {"action": "start"})
        node2.wait_op(op["operation"])
    results = final["metadata"]["results"]
    assert sorted(results) == fleet and final["status"] == "Success"
    assert results["fo07"]["status"] == "Failure" and results["fo07"]["error"] == "Instance is not running"
    ran = {n: r for n, r in results.items() if n != "fo07"}
    for name, r in ran.items():
        assert (r["status"], r["return"], r["stdout"]) == ("Success", len(name), f"{name}\n"), (name, r)
    assert {r["member"] for r in ran.values()} == {"node1", "node2", "node3"}  # each owner ran its share
    assert overlap(ran) <= 7
    assert final["metadata"]["summary"] == {"total": 30, "done": 30, "failed": 1, "running": 0}
