"""A detachable exec left through one member and rejoined through another, or through its own member
after a restart: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio

from cluster_tests.conftest import Cluster, _members_online
from tests.conftest import wait_for
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


async def test_reattach_after_the_clients_member_restarted(cluster: Cluster) -> None:
    """The owner holds the session: the client's member (node2) going away and coming back loses nothing."""
    via2 = Raw(cluster.node(2).socket)
    lines = "".join(f"tick{i}\n" for i in range(40)).encode()  # one a second: it outlasts the restart
    op = await via2.exec_op(INSTANCE, ["sh", "-c", "i=0; while [ $i -lt 40 ]; do echo tick$i; i=$((i+1)); sleep 1; done"],
                            detachable=True)
    first = await connect(via2, op, "1")
    got = await read_until(first, 12)
    await asyncio.get_running_loop().run_in_executor(None, lambda: cluster.script("node", "2", str(cluster.base)))
    first.transport.abort()
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: wait_for(lambda: _members_online(cluster.node(1), 3), 60, "node2 back online"))
    again = await connect(via2, op, "1", offset=len(got))
    rest = await read_until(again)
    final = await via2.wait(op["id"])
    await again.close()
    assert got + rest == lines and final["metadata"]["return"] == 0
