"""A detachable exec left through one member and rejoined through another: nothing lost, nothing twice."""

from __future__ import annotations

from cluster_tests.conftest import Cluster
from tests.test_detach import COUNT, LINES, SLOW, connect, read_until
from tests.wsutil import Raw

INSTANCE = "ic"  # on node3


async def test_reattach_through_another_member(cluster: Cluster) -> None:
    via1, via2 = Raw(cluster.node(1).socket), Raw(cluster.node(2).socket)
    op = await via1.exec_op(INSTANCE, SLOW, detachable=True)
    assert op["location"] == "node3"
    first = await connect(via1, op, "1")
    got = await read_until(first, 400)
    first.transport.abort()  # the client (and its member's relay) gone mid-output
    again = await connect(via2, op, "1", offset=len(got))
    rest = await read_until(again)
    final = await via2.wait(op["id"])
    await again.close()
    assert got + rest == LINES and len(LINES.splitlines()) == COUNT
    assert final["metadata"]["return"] == 0
