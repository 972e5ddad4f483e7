"""NodeAgent: the Ray actor pinned to one node, and the one place that composes api + broker + node.
Thin: it owns a NodeService, the front end, the cluster state and the cluster link, and serves the API
inside its own event loop (as Ray Serve runs uvicorn inside its per-node proxy actor), so a local exec
never crosses a process boundary.

Configuration comes from the node's environment (inherited from the raylet): EXECBROKER_DIR,
EXECBROKER_NODE_NAME, EXECBROKER_CLUSTERED, EXECBROKER_DRIVER, EXECBROKER_HTTPS (an initial
``core.https_address``), EXECBROKER_WORKERS (front-end processes, broker/workers.py); the rest is server config (``/1.0``), kept in the data dir and the cluster.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray

from api.app import create_app, create_fast_path
from api.auth import admin_gid
from api.connection import ClientConnections, Limits
from api.server import ApiServer
from broker import cluster_cert, handoff
from broker.admin import HTTPS_ADDRESS, Admin, MemberConfig
from broker.cluster_link import NAMESPACE, ClusterLink, head_affinity
from broker.frontend import Frontend
from broker.link_service import LinkService
from broker.member_link import MemberLink
from broker.server_state import ActorAuthority, ServerState
from broker.state_actor import STATE_NAME
from broker.state_actor import make_actor as make_state_actor
from broker.workers import WORKER_SOCKET, WorkerPool
from core import workers
from core.errors import ApiError
from core.replicated import Record
from core.sealing import Sealer
from core.server_records import MAX_CONNECTIONS, MAX_OPERATIONS
from node_agent.service import NodeService

log = logging.getLogger(__name__)
LOAD_PERIOD = 0.25  # seconds between updates of this process's load (broker/handoff.Loads)
STATE_PERIOD = 0.5  # seconds between pulls of the cluster state (a revocation reaches every member in < 2 s)
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_OPERATIONS = 20_000


def get_state_actor() -> Any:
    return make_state_actor().options(name=STATE_NAME, namespace=NAMESPACE, get_if_exists=True,
                                      lifetime="detached", **head_affinity()).remote()


@ray.remote(num_cpus=0, max_restarts=-1)
class NodeAgent:
    """Ray restarts an agent that died (on its own node: the controller pins it there); a restarted
    agent starts serving by itself and re-adopts the node's running instances."""

    def __init__(self) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        env = os.environ
        self.data_dir = Path(env.get("EXECBROKER_DIR", "/var/lib/execbroker"))
        self.name = env.get("EXECBROKER_NODE_NAME") or socket.gethostname()
        self.clustered = env.get("EXECBROKER_CLUSTERED", "") == "1"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.service = NodeService(self.data_dir, self.name, clustered=self.clustered,
                                   driver=env.get("EXECBROKER_DRIVER", "auto"), process=0)
        self.frontend = Frontend(self.service)
        self.connections = ClientConnections()
        self.limits = Limits()
        self.server: ApiServer | None = None
        self.link: ClusterLink | None = None
        self.state: ServerState | None = None
        self._starting: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._parent = os.getppid()
        self.processes = int(env.get("EXECBROKER_WORKERS") or 1)  # front-end processes: this one + workers
        self.workers: WorkerPool | None = None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self._restart = asyncio.get_event_loop().create_task(self._start_or_exit())

    async def start(self) -> dict[str, Any]:
        """Adopt the node's instances, join the directory, serve the API; idempotent."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.server is None:
                await self._start()
        assert self.server is not None
        return {"socket": str(self.server.path), "pid": os.getpid(), "node_id": self.node_id,
                "name": self.name, "address": self.server.member_address, "https": self.server.https_address,
                "driver": self.service.instances.driver_name}

    async def _start_or_exit(self) -> None:
        """A restarted agent's own start: one that fails ends the process, and Ray starts another."""
        try:
            await self.start()
        except Exception:  # noqa: BLE001 - logged, then a fresh process tries again
            log.exception("restarted agent failed to start: exiting for Ray to restart it")
            await asyncio.sleep(1.0)
            os._exit(1)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.service.start()
        await self.service.instances.migrate_legacy()
        cert = await loop.run_in_executor(None, lambda: cluster_cert.ensure(
            self.data_dir, cluster_cert.RayKV(), cluster_cert.ray_cluster_secret()))
        state = ServerState(self.data_dir, ActorAuthority(get_state_actor()))
        await state.start()
        state.on_change(self._state_changed)
        member = MemberConfig(self.data_dir)
        if os.environ.get("EXECBROKER_HTTPS") and HTTPS_ADDRESS not in member.values:
            member.values[HTTPS_ADDRESS] = os.environ["EXECBROKER_HTTPS"]
            member.save()
        group = admin_gid()
        if group is None:
            log.warning("no group 'execbroker': the unix socket is root's only (run deploy/system-deps.sh)")
        app_server = ApiServer(self.data_dir / "unix.socket", group, self.limits)
        admin = Admin(state, member, cert.cert_pem, Sealer(cert.key_pem.encode(), "trust tokens"),
                      addresses=self._https_addresses, location=lambda: self.service.location,
                      project_in_use=self.frontend.projects_in_use, on_https_address=app_server.set_https)
        self.frontend.admin = admin
        app_server.app = create_app(self.frontend, state.records.certificate, group)
        app_server.fast = create_fast_path(self.frontend, state.records.certificate, group)
        app_server.set_certificate(cert.cert_pem, cert.key_pem, cert.fingerprint)
        app_server.on_https_client = self.connections.add
        self.state, self.server = state, app_server
        self._apply_limits()
        member_link = MemberLink(self.name, cert.cert_path, cert.key_path)
        member_link.service = LinkService(self.frontend)
        member_link.on_dial = self.service.metrics.link_dials.inc
        self.service.metrics.links.set_function(lambda: member_link.links)
        app_server.on_member_link = member_link.accepted
        link = ClusterLink(self.name, self.node_id, "", member_link,
                           self.service.inventory, on_member_lost=self.frontend.member_lost,
                           on_member_restarted=self.frontend.member_restarted,
                           on_members=self._members_changed,
                           https=lambda: app_server.https_address)
        await app_server.start_member(await self._node_ip())
        link.address = member_link.address = app_server.member_address
        self.frontend.link = link
        self.service.hub.observers.append(link.local_event)
        self.service.hub.observing = link.has_peers
        self.service.on_instance_deleted = link.instance_deleted
        await link.start()
        if self.processes > 1:
            app_server.route = self._route
        await app_server.start()
        if self.processes > 1:
            await self._start_workers(app_server)
        if member.values.get(HTTPS_ADDRESS):
            try:
                await app_server.set_https(member.values[HTTPS_ADDRESS])
            except ApiError as exc:
                log.error("%s=%s: %s", HTTPS_ADDRESS, member.values[HTTPS_ADDRESS], exc.message)
        self.link = link
        self._tasks += [loop.create_task(self._watch_raylet()), loop.create_task(self._sync_state())]
        gc.freeze()  # what start-up made (FastAPI, pydantic, Ray's modules) lives as long as we do: no
        # collection scans it again (measured: a worker spent 9 % of its CPU in the collector)

    async def _start_workers(self, app_server: ApiServer) -> None:
        await app_server.start_workers(self.data_dir / WORKER_SOCKET)
        env = {**os.environ, "EXECBROKER_WORKER_DRIVER": self.service.instances.driver_name}
        self.workers = WorkerPool(self.processes, app_server.unix_socket, self.frontend, self._adopt,
                                  lambda t, m, p: self.service.hub.publish(t, m, p), self._worker_config, env)
        self.frontend.workers = self.workers
        await self.workers.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._publish_load(self.workers)))

    async def _publish_load(self, pool: WorkerPool) -> None:
        """Our slot of the node's loads (broker/handoff.Loads), kept fresh when no connection arrives here."""
        while self.server is not None:
            pool.loads.set(0, self.service.ops.live)
            await asyncio.sleep(LOAD_PERIOD)

    def _worker_config(self) -> dict[str, Any]:
        return {"clustered": self.service.clustered, "max_connections": self.limits.max_connections,
                "max_operations": self.service.ops.max_per_requestor}

    def _route(self, target: bytes, data: bytes, transport: asyncio.BaseTransport) -> bool:
        """A new connection whose first request is for a worker's operation goes to that worker whole;
        any other (but the events stream, ours) to a worker with less work in hand than we have."""
        pool = self.workers
        if pool is None:
            return False
        op_id = workers.operation_in(target.decode("latin-1"))
        if op_id is not None:
            worker = self.frontend.worker_of(op_id)
            return worker is not None and pool.hand(worker, transport, data)
        if workers.is_events(target):
            return False
        return self._balance(pool, transport, data)

    def _balance(self, pool: WorkerPool, transport: asyncio.BaseTransport, data: bytes) -> bool:
        assert self.server is not None
        pool.loads.set(0, self.service.ops.live)
        target = workers.lighter(0, pool.loads.all(self.processes), pool.live, self.service.execs.capacity)
        if target is None or not pool.hand(target, transport, data, handoff.STAY):
            return False
        pool.loads.add(target, 1)
        return True

    def _adopt(self, sock: socket.socket, data: bytes, flags: int) -> None:
        """A connection a worker handed over: served here, or passed on to the worker whose operation it
        asks for (unless a worker gave it back to be served here)."""
        assert self.server is not None and self.workers is not None
        line = workers.request_line(data)
        if line is not None and not flags & handoff.STAY:
            op_id = workers.operation_in(line[1].decode("latin-1"))
            worker = self.frontend.worker_of(op_id) if op_id is not None else None
            if worker is not None and self.workers.hand_socket(worker, sock, data):
                return
        self.server.adopt(sock, data)

    def _members_changed(self, members: int) -> None:
        was = self.service.clustered
        self.service.set_clustered(members > 1)
        if self.workers is not None and self.service.clustered != was:
            self._configure_workers()

    def _configure_workers(self) -> None:
        if self.workers is not None:
            task = asyncio.get_running_loop().create_task(self.workers.configure())
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _https_addresses(self) -> list[str]:
        """Where a token's holder may reach the cluster: every member's HTTPS listener."""
        found = self.link.https_addresses() if self.link is not None else []
        own = self.server.https_address if self.server is not None else ""
        return sorted({*found, *([own] if own else [])})

    def _state_changed(self, records: list[Record]) -> None:
        for rec in records:
            if rec.kind == "certificate" and rec.value is None:
                cut = self.connections.cut(rec.key)
                if cut:
                    log.warning("certificate %s revoked: %d connections closed", rec.key[:12], cut)
            elif rec.kind == "config":
                self._apply_limits()

    def _apply_limits(self) -> None:
        assert self.state is not None
        self.limits.max_connections = self.state.records.config_int(MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS)
        self.service.ops.max_per_requestor = self.state.records.config_int(MAX_OPERATIONS, DEFAULT_MAX_OPERATIONS)
        self._configure_workers()

    async def _sync_state(self) -> None:
        assert self.state is not None
        while True:
            await asyncio.sleep(STATE_PERIOD)
            try:
                await self.state.refresh()
            except ApiError as exc:
                log.warning("cluster state: %s", exc.message)

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

    async def lists_member(self, name: str, node_id: str) -> bool:
        """Whether this member lists ``name`` online on Ray node ``node_id`` (refreshing its table first if
        not: a member restarted on the same name is a new node)."""
        if self.link is None:
            return False
        info = self.link.members.get(name)
        if info is None or not info.alive or info.node_id != node_id:
            await self.link.refresh()
            info = self.link.members.get(name)
        return info is not None and info.alive and info.node_id == node_id

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError("not serving")

    async def ensure_instance(self, name: str, image: str = "busybox") -> bool:
        """Create and start ``name`` when the cluster has no instance at all (``execbroker up``'s c1)."""
        who = self.service.local_identity()
        if await self.frontend.list_instances(None, 0, who):
            return False
        op = await self.frontend.create_instance("default", {"name": name, "source": {"alias": image}, "start": True},
                                                 who, None)
        result = await self.frontend.wait_operation(op["id"], 60, who)
        if result["status_code"] != 200:
            raise RuntimeError(f"creating {name}: {result['err']}")
        return True

    async def shutdown(self) -> None:
        """Stop serving and end every session; instances keep running (they are re-adopted on start)."""
        for task in self._tasks:
            task.cancel()
        if self.workers is not None:
            await self.workers.stop()
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.link is not None:
            await self.link.stop()
        await self.service.close()
