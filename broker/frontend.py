"""The front end every node's API calls: it works out which member owns an instance or operation and
either answers locally (NodeService) or forwards to the owner's agent over Ray (spec §10).

Without a cluster link (tests of one node) everything is local.
"""

from __future__ import annotations

import inspect
from typing import Any

from broker.cluster_link import ClusterLink
from broker.members import member_json, offline_instance
from broker.placement import choose_member
from broker.remote_ops import RemoteOps
from core.errors import ApiError, BadRequest, NotFound, Unavailable
from core.events import Listener
from core.execspec import parse_exec_post
from core.identity import Identity
from node_agent.render import instance_url
from node_agent.service import NodeService, check_instance_name
from node_agent.session import ExecSession


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Frontend:
    def __init__(self, service: NodeService, link: ClusterLink | None = None) -> None:
        self.local = service
        self.link = link
        self.name = service.server_name
        self._owner_cache: dict[str, str] = {}
        self.remote = RemoteOps()

    # -- ownership ----------------------------------------------------------------------------------
    def _is_local_instance(self, name: str) -> bool:
        return self.local.instances.exists(name)

    async def _instance_owner(self, name: str, fresh: bool = False) -> str:
        check_instance_name(name)
        if self.link is None or self._is_local_instance(name):
            return self.name
        if not fresh and name in self._owner_cache:
            return self._owner_cache[name]
        member = await self.link.locate_instance(name)
        if member is None or member == self.name:
            self._owner_cache.pop(name, None)
            raise NotFound("Instance not found")
        self._owner_cache[name] = member
        return member

    async def _on_instance(self, name: str, method: str, *args: Any) -> Any:
        owner = await self._instance_owner(name)
        if owner == self.name:
            return await _maybe_await(getattr(self.local, method)(*args))
        assert self.link is not None
        try:
            return await self.link.call(owner, method, *args)
        except ApiError as exc:
            if exc.status != 404 or exc.message != "Instance not found":
                raise
        owner = await self._instance_owner(name, fresh=True)  # stale cache: ask the directory again
        if owner == self.name:
            return await _maybe_await(getattr(self.local, method)(*args))
        return await self.link.call(owner, method, *args)

    async def _op_owner_of(self, op_id: str) -> str:
        try:
            self.local.ops.get(op_id)
            return self.name
        except NotFound:
            pass
        if self.link is None:
            raise NotFound("Operation not found")
        owner = self.remote.owner.get(op_id) or await self.link.locate_op(op_id)
        if owner is None:
            raise NotFound("Operation not found")
        return owner

    async def _on_op(self, op_id: str, method: str, *args: Any) -> Any:
        owner = await self._op_owner_of(op_id)
        if owner == self.name:
            return await _maybe_await(getattr(self.local, method)(op_id, *args))
        assert self.link is not None
        try:
            return await self.link.call(owner, method, op_id, *args)
        except Unavailable:
            lost = self.remote.lost(op_id, owner)
            if lost is None or method == "cancel_operation":
                raise
            return lost

    # -- cluster events -----------------------------------------------------------------------------
    def receive_events(self, member: str, batch: list[tuple[str, dict[str, Any], str]]) -> None:
        """Events of another member, delivered in order; re-published locally, never forwarded again."""
        for event_type, metadata, project in batch:
            if event_type == "operation":
                self.remote.remember(metadata, member)
            self.local.hub.publish(event_type, metadata, project, location=member, forwarded=True)

    def member_lost(self, member: str) -> None:
        """End, for every listener here, the operations a lost member was running."""
        for op_id in self.remote.running_on(member):
            lost = self.remote.lost(op_id, member)
            if lost is not None:
                self.local.hub.publish("operation", lost, "default", location=member, forwarded=True)
        for name in [n for n, m in self._owner_cache.items() if m == member]:
            del self._owner_cache[name]

    # -- server and cluster -------------------------------------------------------------------------
    def server_info(self, who: Identity) -> dict[str, Any]:
        return self.local.server_info(who)

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
    async def list_instances(self, recursion: int) -> list[Any]:
        result = list(self.local.list_instances(recursion))
        if self.link is None:
            return result
        for part in (await self.link.gather_peers("list_instances", recursion)).values():
            result.extend(part)
        for info in self.link.members.values():
            if not info.alive:
                for name in info.instances:
                    result.append(instance_url(name) if recursion == 0 else offline_instance(name, info.name))
        return sorted(result, key=lambda i: i if isinstance(i, str) else i["name"])

    def _lost_owner(self, name: str) -> str | None:
        if self.link is None:
            return None
        for info in self.link.members.values():
            if not info.alive and name in info.instances:
                return info.name
        return None

    async def get_instance(self, name: str, recursion: int = 1) -> dict[str, Any]:
        try:
            return await self._on_instance(name, "get_instance", name, recursion)
        except Unavailable:
            member = self._lost_owner(name)
            if member is None:
                raise
            return offline_instance(name, member)

    async def get_instance_state(self, name: str) -> dict[str, Any]:
        return await self._on_instance(name, "get_instance_state", name)

    async def create_instance(self, body: dict[str, Any], who: Identity, target: str | None) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Instance name is required")
        check_instance_name(name)
        if self.link is None:
            return self.local.create_instance(body, who)
        member = await self._place(target)
        await self.link.claim_instance(name, member)
        try:
            if member == self.name:
                op = self.local.create_instance(body, who)
            else:
                op = await self.link.call(member, "create_instance", body, who)
        except BaseException:
            self.link.release_instance(name, member)
            raise
        self._owner_cache[name] = member
        if member != self.name:
            self.remote.remember(op, member)
        return op

    async def _place(self, target: str | None) -> str:
        assert self.link is not None
        if target and target not in self.link.members:
            await self.link.refresh()  # it may have joined since the last refresh
        alive = {n: i.alive for n, i in self.link.members.items()}
        counts = {} if target else await self.link.instance_counts()  # fresh: never a stale table
        return choose_member(target, alive, counts, self.name)

    async def update_instance(self, name: str, body: dict[str, Any], who: Identity) -> None:
        await self._on_instance(name, "update_instance", name, body, who)

    async def delete_instance(self, name: str, who: Identity) -> dict[str, Any]:
        return await self._forwarded_op(name, "delete_instance", name, who)

    async def change_state(self, name: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        return await self._forwarded_op(name, "change_state", name, body, who)

    async def _forwarded_op(self, name: str, method: str, *args: Any) -> dict[str, Any]:
        owner = await self._instance_owner(name)
        op: dict[str, Any] = await self._on_instance(name, method, *args)
        if owner != self.name:
            self.remote.remember(op, owner)
        return op

    # -- exec ---------------------------------------------------------------------------------------
    async def exec(self, name: str, body: bytes, who: Identity) -> dict[str, Any]:
        check_instance_name(name)
        post = parse_exec_post(body)  # validation steps 1-4 happen here, once, before any forwarding
        try:
            op = await self._forwarded_op(name, "exec", name, post, who)
        except Unavailable:
            member = self._lost_owner(name)
            if member is None:
                raise
            raise Unavailable(f"Instance {name} is on cluster member {member}, which is offline") from None
        if op["class"] == "websocket" and op["location"] != self.local.location:
            self.remote.forwarded_websocket(op["id"], who)
        return op

    async def exec_output_list(self, name: str) -> list[str]:
        return await self._on_instance(name, "exec_output_list", name)

    async def exec_output_fetch(self, name: str, filename: str) -> int | bytes:
        """A local file as an fd (streamed), a remote one as bytes."""
        owner = await self._instance_owner(name)
        if owner == self.name:
            return self.local.exec_output_open(name, filename)
        return await self._on_instance(name, "exec_output_read", name, filename)

    async def exec_output_delete(self, name: str, filename: str) -> None:
        await self._on_instance(name, "exec_output_delete", name, filename)

    # -- operations ---------------------------------------------------------------------------------
    async def list_operations(self, recursion: int, project: str | None) -> dict[str, list[Any]]:
        merged = self.local.list_operations(recursion, project)
        if self.link is not None:
            for part in (await self.link.gather_peers("list_operations", recursion, project)).values():
                for status, ops in part.items():
                    merged.setdefault(status, []).extend(ops)
        return merged

    async def get_operation(self, op_id: str) -> dict[str, Any]:
        return await self._on_op(op_id, "get_operation")

    async def wait_operation(self, op_id: str, timeout: float | None) -> dict[str, Any]:
        return await self._on_op(op_id, "wait_operation", timeout)

    async def cancel_operation(self, op_id: str) -> None:
        await self._on_op(op_id, "cancel_operation")

    async def websocket_owner(self, op_id: str) -> str:
        """The member that runs an operation (its address when it is another member)."""
        owner = await self._op_owner_of(op_id)
        if owner != self.name:
            assert self.link is not None
            info = self.link.member(owner)
            if not info.alive:
                raise Unavailable(f"Cluster member {owner} is offline")
            return info.address
        return ""

    def precheck_relay(self, op_id: str, secret: str, who: Identity) -> bool:
        return self.remote.precheck_relay(op_id, secret, who)

    def claim_websocket(self, op_id: str, secret: str, who: Identity) -> tuple[ExecSession, str]:
        return self.local.claim_websocket(op_id, secret, who)

    # -- events -------------------------------------------------------------------------------------
    def subscribe(self, types: str | None, project: str | None) -> Listener:
        return self.local.subscribe(types, project)

    def unsubscribe(self, listener: Listener) -> None:
        self.local.unsubscribe(listener)

