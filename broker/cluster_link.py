"""ClusterLink: one agent's connection to the rest of the cluster.

Over Ray (no payload, only who is where):
- membership: which members exist (directory) and which are alive (Ray's node table), refreshed every
  ``PERIOD`` seconds; a member whose Ray node is dead is lost;
- registration: the member record (member-listener and HTTPS addresses) and its instances, re-sent
  whenever the directory's incarnation changes (soft state).

Over the member link (mutual TLS, broker/member_link.py):
- fan-out: operation and lifecycle events of local origin, batched per loop tick, to every other alive
  member (one ordered stream per peer, so each operation's events stay in order);
- calls: ``call(member, method, *args)`` on another member's NodeService, failures mapped to a clear
  503 naming the member.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ray

from broker.directory import DIRECTORY_NAME, make_actor
from broker.event_outbox import EventOutbox
from broker.member_link import MemberLink, Unreachable
from core.errors import ApiError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

NAMESPACE = "execbroker"
PERIOD = 1.0
MOVED_TIMEOUT = 2.0  # seconds to learn where a member that refused a connection listens now


def agent_name(node_id: str) -> str:
    return f"agent-{node_id}"


@dataclass(frozen=True)
class MemberInfo:
    name: str
    node_id: str
    address: str  # its member listener
    alive: bool
    instances: tuple[str, ...]  # instance keys
    https: str = ""  # its HTTPS listener, if it has one


def head_affinity() -> dict[str, Any]:
    """Scheduling options that prefer the head node: cluster-wide actors should not die with a worker."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((str(n["NodeID"]) for n in ray.nodes()
                 if n.get("Alive") and "node:__internal_head__" in (n.get("Resources") or {})), None)
    return {} if head is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=True)}


def get_directory() -> Any:
    return make_actor().options(name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached", **head_affinity()).remote()


class ClusterLink:
    def __init__(self, name: str, node_id: str, address: str, member_link: MemberLink,
                 inventory: Callable[[], list[str]],
                 on_member_lost: Callable[[str, str], None],
                 on_members: Callable[[int], None] | None = None,
                 on_member_restarted: Callable[[str], None] = lambda _name: None,
                 https: Callable[[], str] = lambda: "") -> None:
        self.name = name
        self.node_id = node_id
        self.address = address
        self.member_link = member_link
        self._https = https
        self._registered_https = ""
        self._inventory = inventory
        self._on_member_lost = on_member_lost
        self._on_members = on_members
        self._on_member_restarted = on_member_restarted
        self.directory = get_directory()
        self.members: dict[str, MemberInfo] = {}
        self._epoch = ""
        self._events: list[tuple[str, dict[str, Any], str]] = []
        self._outboxes: dict[str, EventOutbox] = {}  # bounded in batches and bytes (broker/event_outbox.py)
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in [self._task, *self._senders.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.member_link.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("cluster refresh failed")

    async def refresh(self) -> None:
        """Re-register if the directory is new, then rebuild the member table."""
        epoch = await self.directory.epoch.remote()
        https = self._https()
        if epoch != self._epoch or https != self._registered_https:
            epoch, clashes = await self.directory.register_member.remote(
                self.name, self.node_id, self.address, self._inventory(), https)
            if clashes:
                log.error("instances also owned by another member, not registered here: %s", clashes)
            self._epoch, self._registered_https = epoch, https
        table = await self.directory.members.remote()
        alive = await asyncio.get_running_loop().run_in_executor(None, _alive_node_ids)
        before = self.members
        self.members = {
            name: MemberInfo(name, str(m["node_id"]), str(m["address"]), str(m["node_id"]) in alive,
                             tuple(m["instances"]), str(m.get("https", "")))  # type: ignore[arg-type]
            for name, m in table.items()
        }
        for name, info in self.members.items():
            old = before.get(name)
            if not info.alive and (old is None or old.alive or old.node_id != info.node_id):
                self._on_member_lost(name, "")
                await self.member_link.forget(info.address)
            if old is not None and old.address != info.address:
                if info.alive and name != self.name:  # a new agent: what the old one ran died with it
                    self._on_member_restarted(name)
                await self.member_link.forget(old.address)
        if self._on_members is not None:
            self._on_members(len(self.members))

    async def note_peer(self, name: str) -> None:
        """A member called us: make sure it gets our events from now on, even if it joined since the
        last refresh (a client of a just-joined node would otherwise miss the final event)."""
        info = self.members.get(name)
        if info is None or not info.alive:
            await self.refresh()

    # -- directory bookkeeping ----------------------------------------------------------------------
    def instance_deleted(self, name: str) -> None:
        self.directory.release_instance.remote(name, self.name)

    async def claim_instance(self, name: str, member: str) -> None:
        status, message = await self.directory.claim_instance.remote(name, member)
        if status:
            raise ApiError(message, status)

    def release_instance(self, name: str, member: str) -> None:
        self.directory.release_instance.remote(name, member)

    async def locate_instance(self, name: str) -> str | None:
        member: str | None = await self.directory.locate_instance.remote(name)
        return member

    async def instance_counts(self) -> dict[str, int]:
        """Instances per member, fresh from the directory (placement must not use a stale table)."""
        table = await self.directory.members.remote()
        return {name: len(m["instances"]) for name, m in table.items()}

    async def locate_op(self, op_id: str) -> str | None:
        """The member running ``op_id``, asked of every alive peer over the links at once: for an operation
        this member has not heard of yet (its events are on their way, or it was before our time). The
        first that has it answers; None when every peer said no; ``Unavailable`` when one could not say
        within ``MOVED_TIMEOUT``."""

        silent: list[str] = []

        async def ask(name: str) -> str | None:
            try:
                return name if await self.call(name, "has_operation", op_id, timeout=MOVED_TIMEOUT) else None
            except ApiError:
                silent.append(name)
                return None

        peers = [i.name for i in self.members.values() if i.alive and i.name != self.name]
        asks = [asyncio.ensure_future(ask(name)) for name in peers]
        try:
            for answer in asyncio.as_completed(asks, timeout=MOVED_TIMEOUT):
                found = await answer
                if found is not None:
                    return found
        except asyncio.TimeoutError:
            silent = [n for n, t in zip(peers, asks) if not t.done()] + silent
        finally:
            for task in asks:
                task.cancel()
        if silent:  # not "not found": one that did not answer may have it
            raise Unavailable(f"Cluster members {', '.join(sorted(set(silent)))} did not say whether they run "
                              f"operation {op_id}; try again")
        return None

    # -- events fan-out -----------------------------------------------------------------------------
    def local_event(self, event_type: str, metadata: dict[str, Any], project: str) -> None:
        self._events.append((event_type, metadata, project))
        self._schedule_flush()

    def has_peers(self) -> bool:
        """Whether another member is alive (to send this member's events to)."""
        return any(info.alive and info.name != self.name for info in self.members.values())

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._events:
            events, self._events = self._events, []
            peers = [i.name for i in self.members.values() if i.alive and i.name != self.name]
            batch = json.dumps(events) if peers else ""  # one JSON text for every peer
            for member in peers:
                self._enqueue(member, batch)

    def _enqueue(self, member: str, batch: str) -> None:
        outbox = self._outboxes.get(member)
        if outbox is None:
            outbox = self._outboxes[member] = EventOutbox()
            self._senders[member] = asyncio.get_running_loop().create_task(self._send_events(member, outbox))
        dropped = outbox.put(batch)
        if dropped:
            log.warning("events for member %s dropped: %d batches (it is %d batches, %d bytes behind)",
                        member, dropped, len(outbox), outbox.bytes)

    async def _send_events(self, member: str, outbox: EventOutbox) -> None:
        """One ordered stream of event batches to one peer (each waits for the one before)."""
        while True:
            batch = await outbox.get()
            info = self.members.get(member)
            if info is None or not info.alive:
                continue
            try:
                await self.member_link.send_events(member, info.address, batch)
            except Unavailable as exc:
                log.warning("events for member %s lost: %s", member, exc.message)

    # -- calls to other members ---------------------------------------------------------------------
    def member(self, name: str) -> MemberInfo:
        info = self.members.get(name)
        if info is None:
            raise Unavailable(f"Cluster member {name} is unknown")
        return info

    async def call(self, member: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        """``method(*args)`` on ``member``'s NodeService; its ApiError is raised here as is."""
        info = self.member(member)
        if not info.alive:
            raise Unavailable(f"Cluster member {member} is offline")
        return await self.at_member(member, info.address,
                                    lambda at: self.member_link.call(member, at, method, args, timeout))

    async def at_member(self, member: str | None, address: str, send: Callable[[str], Awaitable[T]]) -> T:
        """``send(address)`` to a member; refused there (``Unreachable``: nothing was sent), once more to
        where the member listens now if it moved. ``member`` None: whoever listened at ``address``."""
        try:
            return await send(address)
        except Unreachable:
            if member is None:
                member = self.member_at(address)
            moved = await self.moved(member, address) if member is not None else None
            if moved is None:
                raise
            return await send(moved)

    def member_at(self, address: str) -> str | None:
        """The member that listens at ``address`` as far as this member knows."""
        return next((n for n, i in self.members.items() if i.address == address), None)

    async def moved(self, member: str, address: str) -> str | None:
        """Where ``member``, which listened at ``address``, listens now if it moved (a restarted agent
        listens elsewhere: its registration says where); None if it did not, is gone, or the directory
        does not answer within MOVED_TIMEOUT (a lost head)."""
        fresh = self.members.get(member)
        if fresh is None or fresh.address == address:
            try:
                await asyncio.wait_for(self.refresh(), MOVED_TIMEOUT)
            except Exception:  # noqa: BLE001 - the caller's own error stands
                return None
            fresh = self.members.get(member)
        return fresh.address if fresh is not None and fresh.alive and fresh.address != address else None

    def https_addresses(self) -> list[str]:
        """Where clients may reach the cluster: every alive member's HTTPS listener."""
        return sorted(i.https for i in self.members.values() if i.alive and i.https)

    async def gather_peers(self, method: str, *args: Any) -> dict[str, Any]:
        """``method(*args)`` on every other alive member; members that fail are left out."""
        names = [i.name for i in self.members.values() if i.alive and i.name != self.name]
        results = await asyncio.gather(*(self.call(n, method, *args) for n in names), return_exceptions=True)
        return {n: r for n, r in zip(names, results) if not isinstance(r, BaseException)}


def _alive_node_ids() -> set[str]:
    return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")}

