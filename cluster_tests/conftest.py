"""A real 3-node execbroker cluster on this machine (deploy/local-cluster.sh: one `execbroker up` and one
Ray node per member, each with its own data dir and socket), started once per test session.

Nothing here tunes Ray: `execbroker up`'s own health-check defaults surface a lost node. Instance `ic`
lives on node3 and `ia` on node1: "local" tests talk to the owner, "forwarded" ones to another node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Endpoint, assert_no_leftovers, members_online, private_base, wait_for

_members_online = members_online  # the name the cluster tests import

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local-cluster.sh"


@dataclass
class Cluster:
    base: Path
    env: dict[str, str]

    def node(self, k: int) -> Endpoint:
        return Endpoint(base=self.base, data_dir=self.base / f"node{k}")

    def script(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run(["sh", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"local-cluster.sh {args}: {r.stdout}\n{r.stderr}"
        return r.stdout

    def launch(self, name: str, target: str, via: int = 1) -> None:
        self.node(via).launch(name, target=target)

    def remove(self, name: str, via: int = 1) -> None:
        self.node(via).remove(name)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    base = private_base("ebc-")
    (base / "home").mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_health_check")},
           "RAY_TMPDIR": str(base / "ray"), "EXECBROKER_DEFAULT_INSTANCE": ""}
    c = Cluster(base, env)
    try:
        c.script("up", "3", str(base))
        for k in (1, 2, 3):  # `up` returns once every member lists every other one
            assert members_online(c.node(k), 3), f"node{k} does not list 3 members online"
        c.launch("ia", "node1")
        c.launch("ic", "node3")
        yield c
    finally:
        try:
            for name in ("ia", "ic"):
                try:
                    c.remove(name)
                except Exception:  # noqa: BLE001 - teardown continues; the leak check reports leftovers
                    pass
        finally:
            subprocess.run(["sh", str(SCRIPT), "down", str(base)], env=env, capture_output=True, timeout=300)
            assert_no_leftovers(base, 60)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["local", "forwarded"])
def via(request: pytest.FixtureRequest, cluster: Cluster) -> Endpoint:
    """The node a test talks to about `ic` (on node3): node3 itself, or node1 forwarding to it."""
    return cluster.node(3 if request.param == "local" else 1)
