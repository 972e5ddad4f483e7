"""The agent's worker processes (``execbroker up --workers N``): N-1 children that accept on the node's
unix socket beside the agent, so a node's front end uses more than one core.

Each worker (``node_agent/worker.py``) gets the listening socket, a link to the agent (the member link's
protocol, broker/mux.py, on a socketpair: calls, event batches, websocket streams) and a handoff channel
(broker/handoff.py). It serves the exec path itself (an exec on one of the node's instances, its own
operations' websockets and waits) and sends the agent everything else. The agent reaches a worker's
operation by its id (core/workers.py): a connection for it is handed over whole, a call or a kept-alive
websocket goes over the link. A worker that exits is started again; what it ran ended with it, and its
operations end as Failure for every listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker import handoff, rpc
from broker.frontend import Frontend
from broker.link_service import LinkService
from broker.mux import MuxConnection, MuxStream
from core import workers
from core.identity import Identity

log = logging.getLogger(__name__)
WORKER_SOCKET = "workers.socket"  # the agent's socket for what its workers do not serve (in the data dir)
RESPAWN_DELAY = 1.0  # seconds before a worker that exited is started again
STOP_GRACE = 5.0  # seconds a worker has to end its sessions on stop, then SIGKILL

Publish = Callable[[str, dict[str, Any], str], None]  # (event type, metadata, project): on the agent's hub
# What a worker may ask its agent about an operation it does not run (Frontend methods, same arguments)
AGENT_OP_METHODS = frozenset({"get_operation", "wait_operation", "cancel_operation"})


class Processes(Protocol):
    """How a front-end process reaches the node's operations it does not run: the agent's WorkerPool,
    or a worker's AgentOps."""

    def owner(self, op_id: str) -> int | None: ...

    async def call(self, index: int, method: str, *args: Any) -> Any: ...

    async def gather(self, method: str, *args: Any) -> list[Any]: ...

    async def open(self, index: int, op_id: str, secret: str, who: Identity, offset: int | None) -> MuxStream: ...


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    link: MuxConnection
    channel: socket.socket
    receiver: handoff.Receiver | None = None
    running: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)  # op id -> (last seen, project)


class WorkerPool:
    def __init__(self, processes: int, listener: socket.socket, frontend: Frontend, adopt: handoff.Adopt,
                 publish: Publish, config: Callable[[], dict[str, Any]], env: dict[str, str] | None = None,
                 loads: handoff.Loads | None = None) -> None:
        if not 1 <= processes <= workers.MAX_WORKERS:
            raise ValueError(f"workers must be 1..{workers.MAX_WORKERS}, not {processes}")
        self.processes = processes
        self._listener = listener
        self._frontend = frontend
        self._adopt = adopt
        self.publish = publish
        self._config = config  # what each worker is told at start and on change (configure)
        self._env = env
        self.loads = loads or handoff.Loads()  # each process's connections, shared with the workers
        self._workers: dict[int, _Worker] = {}
        self._watches: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        await asyncio.gather(*(self._start(i) for i in range(1, self.processes)))

    async def _start(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel, their_channel = handoff.pair()
        fds = (self._listener.fileno(), theirs.fileno(), their_channel.fileno(), self.loads.fd)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "node_agent.worker", str(index), str(self.processes), *map(str, fds),
                pass_fds=fds, stdin=subprocess.DEVNULL, env=self._env)
        except BaseException:
            for sock in (ours, channel):
                sock.close()
            raise
        finally:
            theirs.close()
            their_channel.close()
        service = _FromWorker(self, self._frontend)
        link = MuxConnection(service, dialer=True, peer=f"worker {index}")
        worker = service.worker = _Worker(index, process, link, channel)
        await loop.connect_accepted_socket(lambda: link, ours)
        worker.receiver = handoff.Receiver(channel, lambda s, d, f: self._adopt(s, d, f))
        self._workers[index] = worker
        watch = loop.create_task(self._watch(worker))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        await self._configure(worker)  # answered once the worker serves

    async def _configure(self, worker: _Worker) -> None:
        rpc.result(json.loads(await worker.link.call("configure", [self._config()])))

    async def configure(self) -> None:
        """Tell every worker what changed (clustered, limits)."""
        for worker in list(self._workers.values()):
            with contextlib.suppress(Exception):
                await self._configure(worker)

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        worker.link.abort()
        if worker.receiver is not None:
            worker.receiver.close()
        for last, project in worker.running.values():
            self.publish("operation", {**last, "status": "Failure", "status_code": 400,
                                        "err": f"The worker process {worker.index} of this member stopped"}, project)
        if self._stopping:
            return
        log.error("worker %d exited (%s): starting another", worker.index, code)
        await asyncio.sleep(RESPAWN_DELAY)
        if not self._stopping:
            try:
                await self._start(worker.index)
            except Exception:  # the agent serves on without it
                log.exception("worker %d could not be started again", worker.index)

    # -- reaching a worker's operations -----------------------------------------------------------------
    def owner(self, op_id: str) -> int | None:
        """The live worker whose id ``op_id`` carries (None: the agent's, or no such worker)."""
        index = workers.process_of(op_id)
        return index if index and index in self._workers else None

    async def call(self, index: int, method: str, *args: Any) -> Any:
        return rpc.result(await self.call_raw(index, method, rpc.encode(list(args))))

    async def call_raw(self, index: int, method: str, args: Any) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(await self._workers[index].link.call(method, args))
        return reply

    async def gather(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every worker; a worker that fails adds nothing."""
        found = await asyncio.gather(*(self.call(i, method, *args) for i in list(self._workers)),
                                     return_exceptions=True)
        for f in found:
            if isinstance(f, BaseException):
                log.warning("workers: %s: %s: %s", method, type(f).__name__, f)
        return [f for f in found if not isinstance(f, BaseException)]

    async def open(self, index: int, op_id: str, secret: str, who: Identity, offset: int | None) -> MuxStream:
        return await self._workers[index].link.open_stream(rpc.socket_request(op_id, secret, who, offset))

    def hand(self, index: int, transport: asyncio.BaseTransport, data: bytes, flags: int = 0) -> bool:
        worker = self._workers.get(index)
        return worker is not None and handoff.hand(worker.channel, transport, data, flags)

    @property
    def live(self) -> list[int]:
        """The processes that take connections now: the agent and its live workers."""
        return [0, *sorted(self._workers)]

    def hand_socket(self, index: int, sock: socket.socket, data: bytes) -> bool:
        worker = self._workers.get(index)
        return worker is not None and handoff.hand_socket(worker.channel, sock, data)

    async def stop(self) -> None:
        self._stopping = True
        procs = [w.process for w in self._workers.values()]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_GRACE)
        except asyncio.TimeoutError:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for task in list(self._watches):
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)


class _FromWorker(LinkService):
    """What the agent serves a worker on its link: the operations its clients ask it about that it does
    not run (the agent's front end finds them: here, another worker, another member), their websockets,
    and its event batches (published on the agent's hub, as events of this member, so listeners and the
    other members get them)."""

    PEER = ""  # "worker N"

    def __init__(self, pool: WorkerPool, frontend: Frontend) -> None:
        super().__init__(frontend)
        self._pool = pool
        self.worker: _Worker | None = None

    async def call(self, peer: str, method: str, args: Any) -> dict[str, Any]:
        if method not in AGENT_OP_METHODS:
            return {"error": [400, f"unknown method {method}"]}
        return await rpc.serve(self.frontend, method, args)

    def events(self, peer: str, batch: Any) -> None:
        if not isinstance(batch, list):
            raise TypeError("events: a batch is a list")
        running = self.worker.running if self.worker is not None else {}
        for event_type, metadata, project in batch:
            if event_type == "operation" and isinstance(metadata, dict) and isinstance(metadata.get("id"), str):
                if int(metadata.get("status_code", 0)) < 200:
                    running[metadata["id"]] = (metadata, project)
                else:
                    running.pop(metadata["id"], None)
            self._pool.publish(event_type, metadata, project)

    async def _owner(self, op_id: str) -> str:
        """A worker's client may name any operation: the agent's front end finds where it runs."""
        return await self.frontend.websocket_owner(op_id)


class AgentOps:
    """A worker's way to the operations it does not run: its agent, over their link (the agent's
    ``_FromWorker``), which finds them wherever they are."""

    def __init__(self, link: MuxConnection) -> None:
        self._link = link

    def owner(self, op_id: str) -> int | None:
        return 0

    async def call(self, index: int, method: str, *args: Any) -> Any:
        return rpc.result(json.loads(await self._link.call(method, rpc.encode(list(args)))))

    async def gather(self, method: str, *args: Any) -> list[Any]:
        return []  # a worker's lists are the agent's (api/proxy.py)

    async def open(self, index: int, op_id: str, secret: str, who: Identity, offset: int | None) -> MuxStream:
        return await self._link.open_stream(rpc.socket_request(op_id, secret, who, offset))
