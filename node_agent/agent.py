"""NodeAgent: the Ray actor pinned to one node. Thin: it owns a NodeService and serves the API
inside its own event loop (as Ray Serve runs uvicorn inside its per-node proxy actor), so a local exec
never crosses a process boundary."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from api.app import create_app
from api.server import ApiServer
from node_agent.service import NodeService

NAMESPACE = "execbroker"


def agent_name(node_id: str) -> str:
    return f"agent-{node_id}"


@ray.remote(num_cpus=0, max_restarts=0)
class NodeAgent:
    def __init__(self, data_dir: str, server_name: str, clustered: bool = False,
                 socket_mode: int = 0o660, driver: str = "auto") -> None:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.data_dir = Path(data_dir)
        self.socket_path = self.data_dir / "unix.socket"
        self.socket_mode = socket_mode
        self.service = NodeService(self.data_dir, server_name, clustered=clustered, driver=driver)
        self.server: ApiServer | None = None

    async def start(self) -> dict[str, Any]:
        """Adopt the node's instances and serve the API; returns where."""
        self.service.start()
        self.server = ApiServer(create_app(self.service), self.socket_path, self.socket_mode)
        await self.server.start()
        return {"socket": str(self.socket_path), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "driver": self.service.instances.driver_name}

    async def ready(self) -> bool:
        return self.server is not None

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError("not serving")

    async def ensure_instance(self, name: str, image: str = "busybox") -> bool:
        """Create and start ``name`` when the node has no instance at all (``execbroker up``'s c1)."""
        instances = self.service.instances
        if instances.list():
            return False
        instances.create(name, image=image)
        await instances.start(name)
        return True

    async def shutdown(self) -> None:
        """Stop serving and end every session; instances keep running (they are re-adopted on start)."""
        if self.server is not None:
            await self.server.stop()
            self.server = None
        await self.service.close()
