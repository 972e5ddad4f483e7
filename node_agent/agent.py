"""NodeAgent: the Ray actor pinned to one node. Thin: it owns a NodeService, the front end and the
cluster link, and serves the API inside its own event loop (as Ray Serve runs uvicorn inside its
per-node proxy actor), so a local exec never crosses a process boundary.

Configuration comes from the node's environment (inherited from the raylet): EXECBROKER_DIR,
EXECBROKER_NODE_NAME, EXECBROKER_SOCKET_MODE, EXECBROKER_CLUSTERED, EXECBROKER_DRIVER.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import ray

from api.app import create_app
from api.server import ApiServer
from broker.cluster_link import ClusterLink
from broker.frontend import Frontend
from core.errors import ApiError
from node_agent.service import NodeService

log = logging.getLogger(__name__)

TOKEN_KEY = b"execbroker/cluster-token"
# What other members may call through ``call``: the NodeService surface, nothing else.
REMOTE_METHODS = frozenset({
    "list_instances", "get_instance", "get_instance_state", "create_instance", "update_instance",
    "delete_instance", "change_state", "exec", "exec_output_list", "exec_output_read", "exec_output_delete",
    "list_operations", "get_operation", "wait_operation", "cancel_operation",
})


def cluster_token() -> str:
    """One random secret per Ray cluster (GCS key-value store), shared by every member listener."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(TOKEN_KEY, secrets.token_hex(32).encode(), overwrite=False)
    value = internal_kv._internal_kv_get(TOKEN_KEY)
    assert value is not None
    return value.decode()


@ray.remote(num_cpus=0, max_restarts=0)
class NodeAgent:
    def __init__(self) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        env = os.environ
        self.data_dir = Path(env.get("EXECBROKER_DIR", "/var/lib/execbroker"))
        self.name = env.get("EXECBROKER_NODE_NAME") or socket.gethostname()
        self.clustered = env.get("EXECBROKER_CLUSTERED", "") == "1"
        self.socket_mode = int(env.get("EXECBROKER_SOCKET_MODE", "660"), 8)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.service = NodeService(self.data_dir, self.name, clustered=self.clustered,
                                   driver=env.get("EXECBROKER_DRIVER", "auto"))
        self.frontend = Frontend(self.service)
        self.server: ApiServer | None = None
        self.link: ClusterLink | None = None
        self._starting: asyncio.Lock | None = None
        self._watch: asyncio.Task[None] | None = None
        self._parent = os.getppid()

    async def start(self) -> dict[str, Any]:
        """Adopt the node's instances, join the directory, serve the API; idempotent."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.server is None:
                await self._start()
        assert self.server is not None
        return {"socket": str(self.server.path), "pid": os.getpid(), "node_id": self.node_id,
                "name": self.name, "address": self.server.member_address,
                "driver": self.service.instances.driver_name}

    async def _start(self) -> None:
        self.service.start()
        token = await asyncio.get_running_loop().run_in_executor(None, cluster_token)
        server = ApiServer(create_app(self.frontend, token), self.data_dir / "unix.socket", self.socket_mode,
                           member_host=await self._node_ip())
        link = ClusterLink(self.name, self.node_id, server.member_address, self.service.inventory,
                           on_member_lost=self.frontend.member_lost,
                           on_members=lambda n: self.service.set_clustered(n > 1))
        self.frontend.link = link
        self.service.hub.observers.append(link.local_event)
        self.service.on_op_created = link.op_created
        self.service.on_op_expired = link.op_expired
        self.service.on_instance_deleted = link.instance_deleted
        await link.start()
        await server.start()
        self.link, self.server = link, server
        self._watch = asyncio.get_running_loop().create_task(self._watch_raylet())

    async def _node_ip(self) -> str:
        """The address this node's raylet was started with (what peers reach it at)."""
        nodes = await asyncio.get_running_loop().run_in_executor(None, ray.nodes)
        for node in nodes:
            if node["NodeID"] == self.node_id:
                return str(node["NodeManagerAddress"])
        return str(ray.util.get_node_ip_address())

    async def _watch_raylet(self) -> None:
        """An agent whose raylet died is orphaned: its node is lost to the cluster, so it exits at once.

        No graceful shutdown: that would finish operations as if all were well. Exiting closes every
        spawn connection (pid1 then kills those commands) and every relayed socket, and the other
        members report the node's operations as failed."""
        while os.getppid() == self._parent:
            await asyncio.sleep(1.0)
        log.error("raylet gone: exiting")
        os._exit(1)

    async def ready(self) -> bool:
        return self.server is not None

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError("not serving")

    async def call(self, caller: str, method: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        """Another member's front end calling our NodeService; errors travel as (status, message)."""
        if method not in REMOTE_METHODS:
            return "error", (400, f"unknown method {method}")
        if self.link is not None:
            await self.link.note_peer(caller)
        try:
            value = getattr(self.service, method)(*args)
            if asyncio.iscoroutine(value):
                value = await value
        except ApiError as exc:
            return "error", (exc.status, exc.message)
        return "ok", value

    async def receive_events(self, member: str, batch: list[tuple[str, dict[str, Any], str]]) -> None:
        self.frontend.receive_events(member, batch)

    async def ensure_instance(self, name: str, image: str = "busybox") -> bool:
        """Create and start ``name`` when the cluster has no instance at all (``execbroker up``'s c1)."""
        if await self.frontend.list_instances(0):
            return False
        op = await self.frontend.create_instance({"name": name, "source": {"alias": image}, "start": True},
                                                 self.service.local_identity(), None)
        result = await self.frontend.wait_operation(op["id"], 60)
        if result["status_code"] != 200:
            raise RuntimeError(f"creating {name}: {result['err']}")
        return True

    async def shutdown(self) -> None:
        """Stop serving and end every session; instances keep running (they are re-adopted on start)."""
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.link is not None:
            await self.link.stop()
        await self.service.close()
