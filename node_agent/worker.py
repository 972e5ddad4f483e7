"""A worker process of a node's front end (broker/workers.py starts it: ``python -m node_agent.worker
INDEX PROCESSES LISTENER LINK CHANNEL LOADS``, the last four inherited fds).

It accepts on the node's unix socket beside the agent and serves the exec path itself: an exec on one of
the node's instances (in the default project; others need the projects the agent keeps), and its own
operations (their websockets, waits, reads and cancels). Everything else goes to the agent
(api/proxy.py), and a connection whose first request is for another process's operation, or for the
events stream, is handed to that process whole (broker/handoff.py). Its operations' events go to the
agent over the link, which publishes them as this member's. It dies with the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from api.app import create_app, create_fast_path
from api.auth import admin_gid
from api.connection import Limits
from api.server import ApiServer
from broker import handoff, rpc
from broker.event_outbox import EventOutbox
from broker.frontend import Frontend
from broker.link_service import LinkService
from broker.mux import MuxConnection
from broker.workers import WORKER_SOCKET, AgentOps
from core import projects, workers
from core.errors import Unavailable
from node_agent.runtime.instance_view import InstanceView
from node_agent.runtime.records import key as instance_key
from node_agent.service import NodeService, cgroup_parent

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
LOAD_PERIOD = 0.25  # seconds between updates of this process's load
EXEC_PREFIX, EXEC_SUFFIX = "/1.0/instances/", "/exec"


class _AgentCalls(LinkService):
    """What the agent may ask of this worker on the link: its operations (the NodeService surface) and
    ``configure``."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker.frontend)
        self.worker = worker

    async def call(self, peer: str, method: str, args: Any) -> dict[str, Any]:
        if method == "configure" and isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict):
            self.worker.configure(args[0])
            return {"ok": None}
        return await rpc.serve(self.frontend.local, method, args)


class Worker:
    def __init__(self, index: int, processes: int, listener: socket.socket, link: socket.socket,
                 channel: socket.socket, loads: handoff.Loads) -> None:
        env = os.environ
        self.index, self.processes = index, processes
        self.data_dir = Path(env.get("EXECBROKER_DIR", "/var/lib/execbroker"))
        driver = env.get("EXECBROKER_WORKER_DRIVER", "oci")
        view = InstanceView(self.data_dir, driver, cgroup_parent(self.data_dir))
        self.service = NodeService(self.data_dir, env.get("EXECBROKER_NODE_NAME") or socket.gethostname(),
                                   driver=driver, process=index, instances=view)
        self.frontend = Frontend(self.service)
        self.limits = Limits()
        group = admin_gid()
        self.server = ApiServer(self.data_dir / "unix.socket", group, self.limits, unix_sock=listener)
        self.server.app = create_app(self.frontend, admin_group=group,
                                     to_agent=(self.data_dir / WORKER_SOCKET, self._serves_here))
        self.server.fast = create_fast_path(self.frontend, admin_group=group, serves_here=self._serves_http)
        self.server.route = self._route
        self._link_sock, self._channel, self._loads = link, channel, loads
        self._outbox = EventOutbox()
        self._flush_scheduled = False
        self._events: list[tuple[str, dict[str, Any], str]] = []
        self.agent: MuxConnection | None = None

    # -- what this process serves -------------------------------------------------------------------------
    def _serves_here(self, scope: dict[str, Any]) -> bool:
        return self._serves(scope["type"], scope.get("method", ""), scope["path"], scope.get("query_string", b""))

    def _serves_http(self, method: str, path: str, query_string: bytes) -> bool:
        return self._serves("http", method, path, query_string)

    def _serves(self, kind: str, method: str, path: str, query_string: bytes) -> bool:
        if workers.operation_in(path) is not None:  # ours, or the agent's to find (AgentOps)
            return True
        if kind != "http" or method != "POST" or not (path.startswith(EXEC_PREFIX) and path.endswith(EXEC_SUFFIX)):
            return False
        query = urllib.parse.parse_qs(query_string.decode("latin-1"))
        if query.get("project", [projects.DEFAULT])[-1] != projects.DEFAULT or "all-projects" in query:
            return False
        name = path[len(EXEC_PREFIX):-len(EXEC_SUFFIX)]
        return "/" not in name and self.service.instances.exists(instance_key(projects.DEFAULT, name))

    def _route(self, target: bytes, data: bytes, transport: asyncio.BaseTransport) -> bool:
        """A new connection's first request: another process's operation or the events stream goes to
        the agent (which passes on what is a worker's); an id of ours we do not run, to the agent to
        serve (another member's operation)."""
        op_id = workers.operation_in(target.decode("latin-1").partition("?")[0])
        if op_id is not None and self.service.has_operation(op_id):
            return False
        owner = workers.first_request_owner(target, self.index, self.processes)
        if owner is None and op_id is None:
            return self._balance(transport, data)
        return handoff.hand(self._channel, transport, data, handoff.STAY if owner is None else 0)

    def _balance(self, transport: asyncio.BaseTransport, data: bytes) -> bool:
        """A connection that may be served anywhere goes to the agent when it has less work in hand than we do (the
        agent spreads its own among the workers)."""
        self._loads.set(self.index, self.service.ops.live)
        loads = self._loads.all(self.processes)
        if workers.lighter(self.index, loads, [0, self.index], self.service.execs.capacity) is None:
            return False
        if not handoff.hand(self._channel, transport, data, handoff.STAY):
            return False
        self._loads.add(0, 1)
        return True

    async def _publish_load(self) -> None:
        while True:
            self._loads.set(self.index, self.service.ops.live)
            await asyncio.sleep(LOAD_PERIOD)

    def _adopt(self, sock: socket.socket, data: bytes, _flags: int) -> None:
        """A connection the agent handed over: one of our operations, unless we no longer run it (then
        back to the agent, to be served there)."""
        line = workers.request_line(data)
        op_id = workers.operation_in(line[1].decode("latin-1").partition("?")[0]) if line else None
        if op_id is not None and not self.service.has_operation(op_id) and handoff.hand_socket(
                self._channel, sock, data, handoff.STAY):
            return
        self.server.adopt(sock, data)

    def configure(self, config: dict[str, Any]) -> None:
        self.service.set_clustered(bool(config.get("clustered")))
        if isinstance(config.get("max_connections"), int):
            self.limits.max_connections = config["max_connections"]
        if isinstance(config.get("max_operations"), int):
            self.service.ops.max_per_requestor = config["max_operations"]

    # -- events to the agent ---------------------------------------------------------------------------
    def _event(self, event_type: str, metadata: dict[str, Any], project: str) -> None:
        self._events.append((event_type, metadata, project))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        events, self._events = self._events, []
        if events:
            dropped = self._outbox.put(json.dumps(events))
            if dropped:
                log.warning("worker %d: %d event batches for the agent dropped", self.index, dropped)

    async def _send_events(self) -> None:
        while self.agent is not None:
            batch = await self._outbox.get()
            try:
                await self.agent.send_events(batch)
            except Unavailable:
                return

    # -- running ----------------------------------------------------------------------------------------
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.service.hub.observers.append(self._event)
        await self.server.start()
        gc.freeze()  # what start-up made lives as long as we do: no collection scans it again
        receiver = handoff.Receiver(self._channel, self._adopt, on_closed=stop.set)
        self.agent = MuxConnection(_AgentCalls(self), dialer=False, peer="agent", on_lost=lambda _c: stop.set())
        await loop.connect_accepted_socket(lambda: self.agent, self._link_sock)  # type: ignore[arg-type,return-value]
        self.frontend.workers = AgentOps(self.agent)
        sender = loop.create_task(self._send_events())
        counter = loop.create_task(self._publish_load())
        try:
            await stop.wait()
        finally:
            sender.cancel()
            counter.cancel()
            receiver.close()
            await self.server.stop()
            await self.service.close()


def _die_with_parent() -> None:
    """SIGKILL when the agent dies (its sessions' commands die with their spawn connections)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def main(argv: list[str]) -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    index, processes, listener, link, channel, loads = (int(a) for a in argv[:6])
    socks = [socket.socket(fileno=fd) for fd in (listener, link, channel)]
    for sock in socks:
        sock.setblocking(False)
    asyncio.run(Worker(index, processes, *socks, handoff.Loads(loads)).serve())


if __name__ == "__main__":
    main(sys.argv[1:])
