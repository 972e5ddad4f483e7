"""The front end every node's API calls: it works out which member owns an instance or operation and
either answers locally (NodeService) or forwards to the owner over the member link (spec §10).

Instances are named by (project, name): the directory knows them by key (``records.key``). The caller's
identity travels with every forwarded call, so the owner checks the same projects again. Without a
cluster link (tests of one node) everything is local.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from broker import fanout, rpc
from broker.cluster_link import ClusterLink
from broker.member_link import Proxied, Unreachable
from broker.members import member_json, offline_instance
from broker.placement import choose_member
from broker.remote_ops import RemoteOps
from core import projects
from core.errors import ApiError, BadRequest, Forbidden, NotFound, Unavailable
from core.events import Listener
from core.execspec import ExecPost, parse_exec_post
from core.fanout import parse_fanout
from core.identity import Identity
from node_agent.execs import Session
from node_agent.render import instance_url
from node_agent.runtime.records import key as instance_key
from node_agent.runtime.records import split_key
from node_agent.service import NodeService, check_instance_name

if TYPE_CHECKING:
    from broker.admin import Admin
    from broker.workers import Processes

log = logging.getLogger(__name__)
OWNER_CHECK_TIMEOUT = 2.0  # seconds for an owner to say whether it still runs an operation
WORKER_ADDRESS = "worker:"  # websocket_owner's answer for an operation of this member's worker N
# NodeService methods about one operation (its id first): a worker's operation is the worker's to answer
WORKER_OP_METHODS = frozenset({"get_operation", "wait_operation", "cancel_operation", "has_operation"})


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Frontend:
    def __init__(self, service: NodeService, link: ClusterLink | None = None) -> None:
        self.local = service
        self.link = link
        self.admin: Admin | None = None
        self.name = service.server_name
        self._owner_cache: dict[str, str] = {}  # instance key -> member
        self._forwarded = {kind: service.metrics.forwarded.labels(kind).inc for kind in ("call", "websocket", "file")}
        self.remote = RemoteOps()
        self._checks: set[asyncio.Task[None]] = set()  # owners being asked about operations
        self.workers: Processes | None = None  # this node's other front-end processes (broker/workers.py)

    # -- ownership ----------------------------------------------------------------------------------
    async def _instance_owner(self, key: str, fresh: bool = False) -> str:
        if self.link is None or self.local.instances.exists(key):
            return self.name
        if not fresh and key in self._owner_cache:
            return self._owner_cache[key]
        member = await self.link.locate_instance(key)
        if member is None or member == self.name:
            self._owner_cache.pop(key, None)
            raise NotFound("Instance not found")
        self._owner_cache[key] = member
        return member

    async def _on_instance(self, project: str, name: str, method: str, *args: Any) -> Any:
        """``method(project, name, *args)`` on the instance's owner."""
        check_instance_name(name)
        key = instance_key(project, name)
        owner = await self._instance_owner(key)
        if owner == self.name:
            return await _maybe_await(getattr(self.local, method)(project, name, *args))
        assert self.link is not None
        self._forwarded["call"]()
        try:
            return await self.link.call(owner, method, project, name, *args)
        except ApiError as exc:
            if exc.status != 404 or exc.message != "Instance not found":
                raise
        owner = await self._instance_owner(key, fresh=True)  # stale cache: ask the directory again
        if owner == self.name:
            return await _maybe_await(getattr(self.local, method)(project, name, *args))
        return await self.link.call(owner, method, project, name, *args)

    async def _op_owner_of(self, op_id: str) -> str:
        try:
            self.local.ops.get(op_id)
            return self.name
        except NotFound:
            pass
        if self.link is None:
            raise NotFound("Operation not found")
        owner = self.remote.owner_of(op_id) or await self.link.locate_op(op_id)
        if owner is None:
            raise NotFound("Operation not found")
        return owner

    def worker_of(self, op_id: str) -> int | None:
        """The worker process of this node that runs ``op_id``, by its id (None: not a worker's)."""
        if self.workers is None or self.local.has_operation(op_id) or self.remote.owner_of(op_id) is not None:
            return None
        return self.workers.owner(op_id)

    async def _on_op(self, op_id: str, method: str, who: Identity, *args: Any) -> Any:
        """``method(op_id, *args, who)`` on the operation's owner."""
        worker = self.worker_of(op_id)
        if worker is not None:
            assert self.workers is not None
            try:
                return await self.workers.call(worker, method, op_id, *args, who)
            except NotFound:
                pass  # an id of another member's that looks like one of ours
        owner = await self._op_owner_of(op_id)
        if owner == self.name:
            return await _maybe_await(getattr(self.local, method)(op_id, *args, who))
        assert self.link is not None
        self._forwarded["call"]()
        try:
            return await self.link.call(owner, method, op_id, *args, who)
        except Unavailable:
            # Ended here (and announced once) only when the owner is gone: its node is lost, or it no
            # longer knows the operation, or nobody listens where it was; a member that answered
            # nothing this time may still be running it.
            info = self.link.members.get(owner)
            if info is not None and info.alive:
                await self._ask_owner(op_id, owner, who)
            else:
                self._op_lost(op_id, owner)
            last = self.remote.last(op_id)
            if (last is None or last["status_code"] < 200 or method == "cancel_operation"
                    or not who.allows(self.remote.project_of(op_id))):
                raise
            return last

    # -- cluster events -----------------------------------------------------------------------------
    def receive_events(self, member: str, batch: list[tuple[str, dict[str, Any], str]]) -> None:
        """Events of another member, delivered in order; re-published locally, never forwarded again."""
        for event_type, metadata, project in batch:
            if event_type == "operation":
                self.remote.remember(metadata, member, project)
            self.local.hub.publish(event_type, metadata, project, location=member, forwarded=True)

    def member_lost(self, member: str, reason: str = "") -> None:
        """End, for every listener here, the operations a lost member (or its stopped agent) was running."""
        for op_id in self.remote.running_on(member):
            self._op_lost(op_id, member, reason)
        for key in [k for k, m in self._owner_cache.items() if m == member]:
            del self._owner_cache[key]

    def _op_lost(self, op_id: str, member: str, reason: str = "") -> dict[str, Any] | None:
        """End a remote operation here as Failure; its event goes to this member's listeners once, when it
        ends (whichever path saw the loss first: a relay, a forwarded call, membership)."""
        last = self.remote.last(op_id)
        lost = self.remote.lost(op_id, member, reason)
        if lost is not None and last is not None and last["status_code"] < 200:
            self.local.hub.publish("operation", lost, self.remote.project_of(op_id, projects.DEFAULT),
                                   location=member, forwarded=True)
        return lost

    async def check_owner(self, op_id: str, who: Identity) -> None:
        """A relayed socket's owner went away mid-stream: when the owner no longer runs the operation (its
        agent stopped; a new one never knew it), it ends here now, for every listener, instead of when the
        new agent registers."""
        owner, last = self.remote.owner_of(op_id), self.remote.last(op_id)
        if owner is not None and last is not None and last["status_code"] < 200:
            await self._ask_owner(op_id, owner, who)

    def member_restarted(self, member: str) -> None:
        """A member's agent was replaced (its listener moved): what the old agent ran died with it, what
        the new one already runs did not; the new one says which is which."""
        running = self.remote.running_on(member)
        if running:
            task = asyncio.get_running_loop().create_task(self._ask_owner_each(member, running))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _ask_owner_each(self, member: str, op_ids: list[str]) -> None:
        who = self.local.local_identity()
        for op_id in op_ids:
            await self._ask_owner(op_id, member, who)

    async def _ask_owner(self, op_id: str, owner: str, who: Identity) -> None:
        """End the operation here if its owner does not know it (NotFound) or nobody listens where the
        owner was (Unreachable: its agent is gone); anything else (slow, busy) is left to membership."""
        if self.link is None:
            return
        try:
            await self.link.call(owner, "get_operation", op_id, who, timeout=OWNER_CHECK_TIMEOUT)
        except (NotFound, Unreachable):
            self._op_lost(op_id, owner, f"The agent of cluster member {owner} stopped")
        except Exception as exc:  # noqa: BLE001 - a check that could not be made decides nothing
            log.info("operation %s: owner %s not asked: %s", op_id, owner, exc)

    # -- server and cluster -------------------------------------------------------------------------
    def cluster(self) -> dict[str, Any]:
        return {"server_name": self.name, "enabled": self.local.clustered, "member_config": []}

    def members(self, recursion: int) -> list[Any]:
        names = sorted(self.link.members) if self.link else []
        if recursion == 0:
            return [f"/1.0/cluster/members/{n}" for n in names]
        return [member_json(self.link.member(n)) for n in names]

    async def member(self, name: str) -> dict[str, Any]:
        if self.link is not None and name not in self.link.members:
            await self.link.refresh()  # it may have joined since the last refresh
        if self.link is None or name not in self.link.members:
            raise NotFound("Cluster member not found")
        return member_json(self.link.member(name))

    # -- instances ----------------------------------------------------------------------------------
    async def list_instances(self, project: str | None, recursion: int, who: Identity) -> list[Any]:
        """The instances of ``project`` on every member (None: of every project ``who`` may see)."""
        result = list(self.local.list_instances(project, recursion))
        if self.link is not None:
            for part in (await self.link.gather_peers("list_instances", project, recursion)).values():
                result.extend(part)
            for info in self.link.members.values():
                if info.alive:
                    continue
                for key in info.instances:
                    kproject, name = split_key(key)
                    if project is None or kproject == project:
                        result.append(instance_url(name, kproject) if recursion == 0
                                      else offline_instance(name, kproject, info.name))
        if project is None:
            result = [i for i in result if who.allows(_project_of(i))]
        return sorted(result, key=lambda i: i if isinstance(i, str) else (i["project"], i["name"]))

    async def projects_in_use(self) -> dict[str, list[str]]:
        """project -> the URLs of its instances, on every member."""
        used = self.local.projects_in_use()
        if self.link is not None:
            for part in (await self.link.gather_peers("projects_in_use")).values():
                for project, urls in part.items():
                    used.setdefault(project, []).extend(urls)
            for info in self.link.members.values():
                if not info.alive:
                    for key in info.instances:
                        kproject, name = split_key(key)
                        used.setdefault(kproject, []).append(instance_url(name, kproject))
        return used

    def _lost_owner(self, key: str) -> str | None:
        if self.link is None:
            return None
        for info in self.link.members.values():
            if not info.alive and key in info.instances:
                return info.name
        return None

    async def get_instance(self, project: str, name: str, recursion: int = 1) -> dict[str, Any]:
        try:
            return await self._on_instance(project, name, "get_instance", recursion)
        except Unavailable:
            member = self._lost_owner(instance_key(project, name))
            if member is None:
                raise
            return offline_instance(name, project, member)

    async def get_instance_state(self, project: str, name: str) -> dict[str, Any]:
        return await self._on_instance(project, name, "get_instance_state")

    async def create_instance(self, project: str, body: dict[str, Any], who: Identity,
                              target: str | None) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Instance name is required")
        check_instance_name(name)
        if self.link is None:
            return self.local.create_instance(project, body, who)
        if target and who.restricted:
            raise Forbidden("Certificate is restricted")  # restricted clients may not choose members
        key = instance_key(project, name)
        member = await self._place(target)
        await self.link.claim_instance(key, member)
        try:
            if member == self.name:
                op = self.local.create_instance(project, body, who)
            else:
                op = await self.link.call(member, "create_instance", project, body, who)
        except BaseException:
            self.link.release_instance(key, member)
            raise
        self._owner_cache[key] = member
        if member != self.name:
            self.remote.remember(op, member, project)
        return op

    async def _place(self, target: str | None) -> str:
        assert self.link is not None
        if target and target not in self.link.members:
            await self.link.refresh()  # it may have joined since the last refresh
        alive = {n: i.alive for n, i in self.link.members.items()}
        counts = {} if target else await self.link.instance_counts()  # fresh: never a stale table
        return choose_member(target, alive, counts, self.name)

    async def update_instance(self, project: str, name: str, body: dict[str, Any], who: Identity) -> None:
        await self._on_instance(project, name, "update_instance", body, who)

    async def replace_instance(self, project: str, name: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        return await self._forwarded_op(project, name, "replace_instance", body, who)

    async def delete_instance(self, project: str, name: str, who: Identity) -> dict[str, Any]:
        return await self._forwarded_op(project, name, "delete_instance", who)

    async def change_state(self, project: str, name: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        return await self._forwarded_op(project, name, "change_state", body, who)

    async def _forwarded_op(self, project: str, name: str, method: str, *args: Any) -> dict[str, Any]:
        check_instance_name(name)
        owner = await self._instance_owner(instance_key(project, name))
        op: dict[str, Any] = await self._on_instance(project, name, method, *args)
        if owner != self.name:
            self.remote.remember(op, owner, project)
        return op

    # -- exec ---------------------------------------------------------------------------------------
    async def exec(self, project: str, name: str, body: bytes, who: Identity) -> dict[str, Any]:
        check_instance_name(name)
        post = parse_exec_post(body)  # validation steps 1-4 happen here, once, before any forwarding
        try:
            op = await self._forwarded_op(project, name, "exec", post, who)
        except Unavailable:
            member = self._lost_owner(instance_key(project, name))
            if member is None:
                raise
            raise Unavailable(f"Instance {name} is on cluster member {member}, which is offline") from None
        if op["class"] == "websocket" and op["location"] != self.local.location:
            self.remote.forwarded_websocket(op["id"], who)
        return op

    async def exec_capture(self, project: str, name: str, post: ExecPost, who: Identity, limit: int) -> dict[str, Any]:
        """One instance's fan-out share, on its owner."""
        return await self._on_instance(project, name, "exec_capture", post, who, limit)

    async def fanout(self, project: str, body: bytes, who: Identity) -> dict[str, Any]:
        """``POST /1.0/exec``: one command on many instances (broker/fanout.py)."""
        return await fanout.start(self, project, parse_fanout(body), who)

    async def exec_output_list(self, project: str, name: str) -> list[str]:
        return await self._on_instance(project, name, "exec_output_list")

    async def exec_output_fetch(self, project: str, name: str, filename: str) -> int | bytes:
        """A local file as an fd (streamed), a remote one as bytes."""
        check_instance_name(name)
        owner = await self._instance_owner(instance_key(project, name))
        if owner == self.name:
            return self.local.exec_output_open(project, name, filename)
        return await self._on_instance(project, name, "exec_output_read", filename)

    async def exec_output_delete(self, project: str, name: str, filename: str) -> None:
        await self._on_instance(project, name, "exec_output_delete", filename)

    # -- files --------------------------------------------------------------------------------------
    async def file_owner(self, project: str, name: str, local_only: bool) -> tuple[str, str]:
        """(member, its address) of the instance's owner; ("", "") when it is this member. A request that
        another member relayed here (``local_only``) is never relayed again."""
        check_instance_name(name)
        key = instance_key(project, name)
        if local_only or self.link is None:
            if not self.local.instances.exists(key):
                raise NotFound("Instance not found")
            return "", ""
        owner = await self._instance_owner(key)
        if owner == self.name:
            return "", ""
        assert self.link is not None
        info = self.link.member(owner)
        if not info.alive:
            raise Unavailable(f"Instance {name} is on cluster member {owner}, which is offline")
        return owner, info.address

    async def relay(self, member: str, address: str, method: str, path: str, params: dict[str, str],
                    headers: dict[str, str], body: AsyncIterator[bytes] | None, who: Identity) -> Proxied:
        """A request relayed to the member that owns what it names (files: streamed both ways)."""
        assert self.link is not None
        self._forwarded["file"]()
        link = self.link  # refused before a byte of the body was read: it can go to where the member moved
        return await link.at_member(member, address, lambda at: link.member_link.stream(
            member, at, method, path, params, headers, body, who))

    # -- exec audit ---------------------------------------------------------------------------------
    async def audit_records(self, limit: int, project: str | None, who: Identity) -> list[dict[str, Any]]:
        """The last ``limit`` exec audit records of the whole cluster, oldest first."""
        records = list(await self.local.audit_records(limit, project, who))
        if self.link is not None:
            for part in (await self.link.gather_peers("audit_records", limit, project, who)).values():
                records.extend(part)
        records.sort(key=lambda r: (str(r.get("ended_at", "")), str(r.get("operation", ""))))
        return records[-limit:]

    # -- metrics ------------------------------------------------------------------------------------
    async def metrics_text(self, target: str | None, who: Identity) -> str:
        """``GET /1.0/metrics`` of this member, or of ``target``."""
        if not target or target == self.name or self.link is None:
            if target and target != self.name:
                raise NotFound("Cluster member not found")
            return await self.node_metrics(who)
        if target not in self.link.members:
            await self.link.refresh()
        if target not in self.link.members:
            raise NotFound("Cluster member not found")
        self._forwarded["call"]()
        return await self.link.call(target, "metrics_text", who)

    async def node_metrics(self, who: Identity) -> str:
        """This member's metrics: the agent's, with what its workers counted added."""
        others = await self.workers.gather("metrics_samples") if self.workers is not None else []
        return self.local.metrics_text(who, others)

    # -- operations ---------------------------------------------------------------------------------
    async def node_operations(self, project: str | None, recursion: int, who: Identity) -> dict[str, list[Any]]:
        """This member's operations: the agent's and its workers'."""
        merged = self.local.list_operations(project, recursion, who)
        if self.workers is not None:
            for part in await self.workers.gather("list_operations", project, recursion, who):
                for status, ops in part.items():
                    merged.setdefault(status, []).extend(ops)
        return merged

    async def serve_call(self, method: str, args: Any) -> dict[str, Any]:
        """A member's call to this member's NodeService (broker/rpc.py): an operation of one of its
        workers is that worker's to answer; the list gathers them."""
        whole = {"list_operations": (self.node_operations, 3), "metrics_text": (self.node_metrics, 1)}
        if method in whole and self.workers is not None and isinstance(args, list) and len(args) == whole[method][1]:
            try:
                return {"ok": rpc.encode(await whole[method][0](*rpc.decode(args)))}
            except (TypeError, ValueError) as exc:
                return {"error": [400, f"bad arguments for {method}: {exc}"]}
        if method in WORKER_OP_METHODS and isinstance(args, list) and args and isinstance(args[0], str):
            worker = self.worker_of(args[0])
            if worker is not None:
                assert self.workers is not None
                reply = await self.workers.call_raw(worker, method, args)
                if reply.get("error", [0])[0] != 404:  # else another member's id that looks like ours
                    return reply
        return await rpc.serve(self.local, method, args)

    async def list_operations(self, project: str | None, recursion: int, who: Identity) -> dict[str, list[Any]]:
        merged = await self.node_operations(project, recursion, who)
        if self.link is not None:
            for part in (await self.link.gather_peers("list_operations", project, recursion, who)).values():
                for status, ops in part.items():
                    merged.setdefault(status, []).extend(ops)
        if self.admin is not None and not who.restricted and project in (None, projects.DEFAULT):
            tokens = self.admin.token_operations()  # cluster-wide state: listed once, here
            if tokens:
                merged.setdefault("running", []).extend(t if recursion else f"/1.0/operations/{t['id']}"
                                                        for t in tokens)
        return merged

    def _token_op(self, op_id: str, who: Identity) -> dict[str, Any] | None:
        if self.admin is None or who.restricted:
            return None
        return self.admin.token_operation(op_id)

    async def get_operation(self, op_id: str, who: Identity) -> dict[str, Any]:
        token = self._token_op(op_id, who)
        if token is not None:
            return token
        return await self._on_op(op_id, "get_operation", who)

    async def wait_operation(self, op_id: str, timeout: float | None, who: Identity) -> dict[str, Any]:
        token = self._token_op(op_id, who)
        if token is not None:
            return token  # a token stays Running until used or revoked; waiting on it returns at once
        return await self._on_op(op_id, "wait_operation", who, timeout)

    async def cancel_operation(self, op_id: str, who: Identity) -> None:
        if self._token_op(op_id, who) is not None:
            assert self.admin is not None
            await self.admin.revoke_token(op_id)
            return
        await self._on_op(op_id, "cancel_operation", who)

    async def websocket_owner(self, op_id: str) -> str:
        """The member that runs an operation (its address when it is another member, ``worker:N`` for a
        worker process of this member)."""
        worker = self.worker_of(op_id)
        if worker is not None:
            return f"{WORKER_ADDRESS}{worker}"
        owner = await self._op_owner_of(op_id)
        if owner != self.name:
            assert self.link is not None
            info = self.link.member(owner)
            if not info.alive:
                raise Unavailable(f"Cluster member {owner} is offline")
            return info.address
        return ""

    async def dial_owner(self, address: str, op_id: str, secret: str, who: Identity,
                         offset: int | None = None) -> Any:
        """The owner's exec websocket for a relay (over the member link, or a worker's link)."""
        if address.startswith(WORKER_ADDRESS) and self.workers is not None:
            return await self.workers.open(int(address[len(WORKER_ADDRESS):]), op_id, secret, who, offset)
        assert self.link is not None
        self._forwarded["websocket"]()
        link = self.link  # a new operation of a restarted agent this member has not seen move yet
        member = link.member_at(address)
        return await link.at_member(member, address, lambda at: link.member_link.dial_exec_socket(
            member or address, at, op_id, secret, who, offset))

    def precheck_relay(self, op_id: str, secret: str, who: Identity) -> bool:
        return self.remote.precheck_relay(op_id, secret, who)

    def claim_websocket(self, op_id: str, secret: str, who: Identity,
                        offset: int | None = None) -> tuple[Session, str]:
        return self.local.claim_websocket(op_id, secret, who, offset)

    # -- events -------------------------------------------------------------------------------------
    def subscribe(self, types: str | None, project: str | None) -> Listener:
        return self.local.subscribe(types, project)

    def unsubscribe(self, listener: Listener) -> None:
        self.local.unsubscribe(listener)


def _project_of(item: str | dict[str, Any]) -> str:
    if isinstance(item, dict):
        return str(item.get("project", projects.DEFAULT))
    _, _, query = item.partition("?project=")
    return query or projects.DEFAULT
