"""The controller: keeps exactly one NodeAgent on every alive Ray node (as the Ray Serve controller keeps
one proxy per node), so a node that joins with plain ``ray start --address`` gets its agent too.

Agents are detached, named ``agent-<node id>`` and pinned with hard node affinity: an agent is never
restarted elsewhere (the old one may still run on its node); a node that comes back is a new Ray node
and gets a new agent, which re-adopts the instances from its data dir.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from broker.cluster_link import NAMESPACE, agent_name, get_directory, head_affinity
from node_agent.agent import NodeAgent

log = logging.getLogger(__name__)

CONTROLLER_NAME = "execbroker-controller"
PERIOD = 1.0


def agent_for(node_id: str) -> Any:
    """The node's agent, created if missing (idempotent across callers)."""
    return NodeAgent.options(  # type: ignore[attr-defined]
        name=agent_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_concurrency=100_000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote()


@ray.remote(num_cpus=0, max_restarts=-1)
class Controller:
    def __init__(self) -> None:
        self.started: dict[str, Any] = {}
        self._task = asyncio.get_event_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - keep reconciling
                log.exception("reconcile failed")
            await asyncio.sleep(PERIOD)

    async def reconcile(self) -> list[str]:
        nodes = await asyncio.get_running_loop().run_in_executor(None, ray.nodes)
        alive = {str(n["NodeID"]) for n in nodes if n.get("Alive")}
        for node_id in list(self.started):
            if node_id not in alive:
                del self.started[node_id]
        pending = []
        for node_id in sorted(alive - set(self.started)):
            agent = agent_for(node_id)
            self.started[node_id] = agent
            pending.append((node_id, agent.start.remote()))
        for node_id, ref in pending:
            try:
                await ref
            except Exception as exc:  # noqa: BLE001 - retried on the next round
                log.error("agent on node %s failed to start: %s", node_id, exc)
                self.started.pop(node_id, None)
        return sorted(self.started)


def ensure_controller() -> Any:
    """The cluster's controller and directory (created once, by whichever ``execbroker up`` comes
    first), both on the head node when it is there."""
    get_directory()
    return Controller.options(  # type: ignore[attr-defined]
        name=CONTROLLER_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", **head_affinity(),
    ).remote()
