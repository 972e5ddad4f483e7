"""Cluster membership, placement, the directory and cross-node events and clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.asyncio.client import unix_connect

from cluster_tests.conftest import Cluster
from tests.conftest import Endpoint
from tests.wsutil import Raw, run


def test_members_and_server_info(cluster: Cluster) -> None:
    for k in (1, 2, 3):
        ep = cluster.node(k)
        info = ep.api("GET", "/1.0", status=200)["metadata"]["environment"]
        assert info["server_clustered"] is True and info["server_name"] == f"node{k}"
        members = ep.api("GET", "/1.0/cluster/members?recursion=1")["metadata"]
        assert sorted(m["server_name"] for m in members) == ["node1", "node2", "node3"]
        assert all(m["status"] == "Online" for m in members)
    assert cluster.node(2).api("GET", "/1.0/cluster/members/node3")["metadata"]["status"] == "Online"
    assert cluster.node(2).api("GET", "/1.0/cluster/members/nope")["error_code"] == 404
    r = cluster.node(1).lxc("cluster", "list", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().count("ONLINE") == 3


def test_instances_listed_everywhere_with_location(cluster: Cluster) -> None:
    for k in (1, 2, 3):
        insts = {i["name"]: i for i in cluster.node(k).api("GET", "/1.0/instances?recursion=1")["metadata"]}
        assert insts["ic"]["location"] == "node3" and insts["ia"]["location"] == "node1"
    r = cluster.node(2).lxc("list", "--format", "csv", "-c", "nsL")
    assert "ic,RUNNING,node3" in r.stdout.decode(), r.stdout + r.stderr


def test_lxc_on_node1_against_node3(cluster: Cluster) -> None:
    ep = cluster.node(1)
    r = ep.lxc("exec", "ic", "--", "sh", "-c", "hostname; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"ic\n", b"err\n")
    data = bytes(range(256)) * 4096
    r = ep.lxc("exec", "ic", "--", "cat", input=data)
    assert r.stdout == data
    assert ep.lxc("exec", "ic", "--", "no-such").returncode == 127


def test_lxc_concurrent_forwarded(cluster: Cluster) -> None:
    ep = cluster.node(2)

    def one(i: int) -> bool:
        r = ep.lxc("exec", "ic" if i % 2 else "ia", "--", "echo", str(i), timeout=120)
        return r.returncode == 0 and r.stdout == f"{i}\n".encode()

    with ThreadPoolExecutor(10) as pool:
        assert all(pool.map(one, range(60)))


async def test_events_from_every_node(cluster: Cluster) -> None:
    listener = await unix_connect(str(cluster.node(2).socket), "ws://eb/1.0/events?type=operation",
                                  compression=None)
    _, _, _, op = await run(Raw(cluster.node(1).socket), "ic", ["true"])
    seen = []
    while not seen or seen[-1]["status_code"] < 200:
        ev = json.loads(await asyncio.wait_for(listener.recv(), 15))
        if ev["metadata"]["id"] == op["id"]:
            assert ev["location"] == "node3"
            seen.append(ev["metadata"])
    assert seen[-1]["status"] == "Success" and seen[-1]["metadata"]["return"] == 0
    assert all(m["status_code"] < 200 for m in seen[:-1])  # one final event, and it comes last
    await listener.close()


def test_operations_merged_and_routed(cluster: Cluster) -> None:
    ep1, ep2 = cluster.node(1), cluster.node(2)
    op = ep1.api("POST", "/1.0/instances/ic/exec", {"command": ["sleep", "0.1"]}, status=202)["metadata"]
    assert op["location"] == "node3"
    assert ep2.wait_op(f"/1.0/operations/{op['id']}")["metadata"]["return"] == 0
    listing = ep2.api("GET", "/1.0/operations")["metadata"]
    assert f"/1.0/operations/{op['id']}" in listing.get("success", [])
    assert ep2.api("GET", f"/1.0/operations/{op['id']}")["metadata"]["location"] == "node3"


def test_placement_and_name_clash(cluster: Cluster) -> None:
    ep = cluster.node(1)
    try:
        cluster.launch("pl1", "node2")
        assert ep.api("GET", "/1.0/instances/pl1")["metadata"]["location"] == "node2"
        op = ep.api("POST", "/1.0/instances", {"name": "pl2", "source": {"alias": "busybox"}}, status=202)
        assert ep.wait_op(op["operation"])["status"] == "Success"
        # node1 and node3 hold one instance each (ia, ic), node2 held one (pl1): a tie, any but a 2nd on node2
        where = ep.api("GET", "/1.0/instances/pl2")["metadata"]["location"]
        assert where in ("node1", "node3")
        clash = cluster.node(3).api("POST", "/1.0/instances", {"name": "pl1", "source": {"alias": "busybox"}})
        assert clash["error_code"] == 409

        def create(k: int) -> int:
            return int(cluster.node(k).api("POST", "/1.0/instances", {"name": "race", "source": {}})["error_code"])

        with ThreadPoolExecutor(3) as pool:
            codes = sorted(pool.map(create, (1, 2, 3)))
        assert codes == [0, 409, 409]
    finally:
        for name in ("pl1", "pl2", "race"):
            cluster.remove(name)


def test_directory_restart_loses_nothing(cluster: Cluster) -> None:
    """Kill the directory actor together with its saved member table: Ray restarts it empty, and the
    agents alone rebuild it. The front ends cache owners, so the directory itself is asked (from a Ray
    driver): a new incarnation and the same member table as before (nodes, addresses, instances); an
    operation that was running on node3 through the restart ends as it should, seen from node2."""
    from tests.conftest import wait_for

    ep1 = cluster.node(1)
    flag = f"/tmp/directory-restart-{os.getpid()}"
    op = ep1.api("POST", "/1.0/instances/ic/exec",
                 {"command": ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.1; done"]}, status=202)["metadata"]
    assert op["location"] == "node3" and op["status"] == "Running"
    before = _directory(cluster)
    assert before["ic"] == "node3" and before["ia"] == "node1", before
    assert sorted(before["members"]) == ["node1", "node2", "node3"], before
    _ray_driver(cluster, f"internal_kv._internal_kv_del({DIRECTORY_KV_KEY!r}); ray.kill(d, no_restart=False); print('null')")

    def rebuilt() -> dict[str, Any] | None:
        now = _directory(cluster)
        return now if now["epoch"] != before["epoch"] and sorted(now["members"]) == sorted(before["members"]) else None

    after = wait_for(rebuilt, 90, "a new directory with every member registered again", interval=0.5)
    assert after["members"] == before["members"]  # re-registered by the agents: the saved copy was deleted
    assert (after["ic"], after["ia"]) == ("node3", "node1")

    def routed() -> bool:
        r = cluster.node(1).api("POST", "/1.0/instances/ic/exec", {"command": ["true"]})
        return r.get("error_code") == 0

    wait_for(routed, 30, "exec on ic routed again after the directory restart", interval=0.5)
    assert cluster.node(2).api("GET", "/1.0/instances/ic")["metadata"]["location"] == "node3"
    done = ep1.api("POST", "/1.0/instances/ic/exec", {"command": ["touch", flag]}, status=202)["metadata"]
    assert ep1.wait_op(f"/1.0/operations/{done['id']}")["metadata"]["return"] == 0
    final = cluster.node(2).wait_op(f"/1.0/operations/{op['id']}")
    assert (final["status"], final["metadata"]["return"]) == ("Success", 0)


DIRECTORY_KV_KEY = b"execbroker/directory-members"  # where the directory saves its member table (broker/directory.py)


def _ray_driver(cluster: Cluster, body: str) -> Any:
    """Run ``body`` in a Ray driver of the cluster, ``d`` being the directory actor; what it printed last, as JSON."""
    code = ("import json, ray\nfrom ray.experimental import internal_kv\n"
            "ray.init(address='auto', namespace='execbroker', log_to_driver=False)\n"
            "d = ray.get_actor('execbroker-directory')\n" + body)
    r = subprocess.run([sys.executable, "-c", code], env={**cluster.env, "RAY_ADDRESS": _head(cluster),
                                                          "RAY_AUTH_MODE": "token"},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _directory(cluster: Cluster) -> dict[str, Any]:
    """What the directory actor itself holds: incarnation, member table, owners of ic and ia."""
    return _ray_driver(cluster, (
        "print(json.dumps({'epoch': ray.get(d.epoch.remote()), 'members': ray.get(d.members.remote()),"
        " 'ic': ray.get(d.locate_instance.remote('ic')), 'ia': ray.get(d.locate_instance.remote('ia'))}))"))


def _head(cluster: Cluster) -> str:
    log = (cluster.base / "node1" / "up.log").read_text()
    return log.split("execbroker up --address ")[1].split()[0]


def test_plain_ray_start_node_gets_an_agent(cluster: Cluster) -> None:
    """A node joined with plain `ray start` (no execbroker up): the controller gives it an agent, which
    takes its settings from the node's environment and serves like any member."""
    from broker.raynode import ray_binary
    from tests.conftest import wait_for

    data = cluster.base / "node4"
    data.mkdir()
    env = {**cluster.env, "RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "EXECBROKER_DIR": str(data),
           "EXECBROKER_NODE_NAME": "node4", "EXECBROKER_CLUSTERED": "1"}
    proc = subprocess.Popen([ray_binary(), "start", "--block", f"--address={_head(cluster)}",
                             "--labels=execbroker-name=node4", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    node4 = Endpoint(base=cluster.base, data_dir=data)
    try:
        wait_for(lambda: node4.socket.exists() and _answers(node4), 120, "node4's agent serving")
        cluster.launch("i4", "node4", via=2)  # at once: node2 must not answer from a stale member table
        assert _online(cluster, "node4")
        r = cluster.node(1).lxc("exec", "i4", "--", "hostname")
        assert r.stdout == b"i4\n", r.stderr
        assert node4.api("GET", "/1.0")["metadata"]["environment"]["server_name"] == "node4"
        cluster.remove("i4")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _answers(ep: Endpoint) -> bool:
    try:
        return ep.api("GET", "/1.0").get("error_code") == 0
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def _online(cluster: Cluster, name: str) -> bool:
    r = cluster.node(1).api("GET", f"/1.0/cluster/members/{name}")
    return r.get("metadata", {}) is not None and (r.get("metadata") or {}).get("status") == "Online"
