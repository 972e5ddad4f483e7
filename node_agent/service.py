"""NodeService: everything one node answers for, as plain methods returning Incus wire JSON.

The front end (broker/frontend.py) calls this, locally or on another member's behalf; the Ray actor
(node_agent/agent.py) owns one. No HTTP here. Instances are named by (project, name); every method that
touches an operation is given the caller, and an operation of a project the caller may not see is
"not found" here too, whoever forwarded the call.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from core import events as ev
from core import workers
from core.errors import BadRequest, NotFound
from core.events import EventHub, Listener
from core.execspec import ExecPost
from core.filespec import PushSpec
from core.identity import Identity
from core.operations import Operation, OperationRegistry, render
from node_agent.audit import MAX_LIMIT, AuditLog
from node_agent.execs import Execs, Session
from node_agent.files import Download, Files
from node_agent.metrics import Metrics
from node_agent.render import instance_url, render_instance, render_state
from node_agent.render_images import alias_url, image_url, render_alias, render_image
from node_agent.runtime import records
from node_agent.runtime.instances import Instance, InstanceManager
from node_agent.server_info import render_server


def check_instance_name(name: str) -> None:
    if "/" in name:
        raise BadRequest("Invalid instance name")


# What lxc prints while an image is made ("Retrieving image: ..."): any metadata key ending in _progress.
PROGRESS_KEY = "create_instance_from_image_unpack_progress"


def cgroup_parent(data_dir: Path) -> str:
    """The node's cgroup tree: one per data dir, since two brokers on a host may use the same instance names."""
    return "execbroker-" + hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]


class NodeService:
    def __init__(self, data_dir: Path, server_name: str, clustered: bool = False,
                 driver: str = "auto", retention: float = 5.0, process: int = 0,
                 instances: InstanceManager | None = None) -> None:
        """``process``: which of the node's front-end processes this is (0: the agent; its operation ids
        say so, core/workers.py); ``instances``: a worker's read-only view of the agent's."""
        self.data_dir = data_dir
        self.server_name = server_name
        self.hub = EventHub()
        self.ops = OperationRegistry("none", self._op_changed, retention, on_expire=self._op_expired,
                                     new_id=lambda: workers.operation_id(process))
        self.clustered = False
        self.set_clustered(clustered)
        # Cluster hook (broker/cluster_link.py): directory bookkeeping of what this node owns.
        self.on_instance_deleted: Callable[[str], None] | None = None  # gets the instance's key
        self.instances = instances or InstanceManager(data_dir, driver=driver, cgroup_parent=cgroup_parent(data_dir))
        self.metrics = Metrics(self.instances, self.ops)
        self.audit = AuditLog(data_dir / "audit.jsonl")
        self.execs = Execs(self.instances, self.ops, self._lifecycle, self.metrics, self.audit,
                           lambda: self.server_name)
        self.files = Files(self.instances, self._lifecycle, self.metrics)

    def start(self) -> None:
        self.instances.adopt()

    async def close(self) -> None:
        await self.ops.close()
        self.hub.close()

    def _op_changed(self, op: Operation) -> None:
        if self.hub.wants("operation", op.project):
            self.hub.publish("operation", render(op), project=op.project)
        if op.status.final:
            self.execs.finished(op)

    def _op_expired(self, op_id: str) -> None:
        self.execs.expired(op_id)

    def _lifecycle(self, action: str, key: str, requestor: Identity | None,
                   context: dict[str, Any] | None = None) -> None:
        project, name = records.split_key(key)
        if not self.hub.wants("lifecycle", project):
            return
        self.hub.publish("lifecycle", ev.lifecycle(action, instance_url(name, project),
                                                   requestor.to_json() if requestor else None, context),
                         project=project)

    def set_clustered(self, clustered: bool) -> None:
        """A node is a cluster member (``location`` = its name) once it was told so or a peer joined."""
        self.clustered = self.clustered or clustered
        self.location = self.server_name if self.clustered else "none"
        self.hub.location = self.ops.location = self.location

    def local_identity(self) -> Identity:
        """The node acting on its own behalf (e.g. creating the default instance)."""
        return Identity(username="root", protocol="unix")

    # -- server -------------------------------------------------------------------------------------
    def server_info(self, who: Identity, **extra: Any) -> dict[str, Any]:
        return render_server(who, self.server_name, self.clustered, self.instances.driver_name, **extra)

    # -- instances ----------------------------------------------------------------------------------
    @staticmethod
    def _key(project: str, name: str) -> str:
        check_instance_name(name)
        return records.key(project, name)

    def list_instances(self, project: str | None, recursion: int) -> list[Any]:
        """The instances of ``project`` (None: every project)."""
        insts = sorted((i for i in self.instances.list() if project is None or i.project == project),
                       key=lambda i: (i.project, i.name))
        if recursion == 0:
            return [instance_url(i.name, i.project) for i in insts]
        return [render_instance(i, self.location, recursion, self._usage(i) if recursion >= 2 else None)
                for i in insts]

    def _usage(self, inst: Instance) -> dict[str, int | None]:
        return self.instances.usage(records.key(inst.project, inst.name))

    def get_instance(self, project: str, name: str, recursion: int = 1) -> dict[str, Any]:
        inst = self.instances.get(self._key(project, name))
        return render_instance(inst, self.location, recursion, self._usage(inst) if recursion >= 2 else None)

    def get_instance_state(self, project: str, name: str) -> dict[str, Any]:
        inst = self.instances.get(self._key(project, name))
        return render_state(inst, self._usage(inst))

    def _task(self, key: str, description: str, who: Identity, work: Any) -> dict[str, Any]:
        project, name = records.split_key(key)
        op = self.ops.create("task", description, {"instances": [instance_url(name, project)]}, {}, who,
                             project=project)

        async def run(_op: Operation) -> None:
            await work()

        self.ops.start(op, run)
        return render(op)

    # ------------------------------------------------------------------------------------ images

    def list_images(self, recursion: int) -> list[Any]:
        found = self.instances.images.list()
        return [render_image(i) for i in found] if recursion else [image_url(i) for i in found]

    def get_image(self, ref: str) -> dict[str, Any]:
        return render_image(self.instances.images.get(ref))

    def list_image_aliases(self, recursion: int) -> list[Any]:
        found = self.instances.images.list()
        return [render_alias(i) for i in found] if recursion else [alias_url(i) for i in found]

    def get_image_alias(self, name: str) -> dict[str, Any]:
        img = self.instances.images.get(name)
        if img.alias != name:
            raise NotFound("Image alias not found")
        return render_alias(img)

    def create_instance(self, project: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        """Checks here (bad name, image or config, a taken name: the request's error); the image build, the
        rootfs and the start run in the operation, which reports the build's progress in its metadata."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Instance name is required")
        key = self._key(project, name)
        source = body.get("source") or {}
        if not isinstance(source, dict):
            raise BadRequest("Invalid source")
        image = self.instances.images.resolve(source)
        config = _config_of(body) or {}
        start = bool(body.get("start"))
        res = self.instances.reserve(name, image, config, project)
        try:
            op = self.ops.create("task", "Creating instance", {"instances": [instance_url(name, project)]}, {}, who,
                                 project=project)
        except BaseException:
            self.instances.release(res)
            raise

        async def run(_op: Operation) -> None:
            await self.instances.create_reserved(res, lambda text: op.extend_metadata({PROGRESS_KEY: text}))
            self._lifecycle("instance-created", key, who)
            if start:
                await self.instances.start(key)
                self._lifecycle("instance-started", key, who)

        self.ops.start(op, run)
        return render(op)

    async def update_instance(self, project: str, name: str, body: dict[str, Any], who: Identity) -> None:
        """PATCH: the keys given are set, the others kept."""
        key = self._key(project, name)
        await self.instances.update_config(key, _config_of(body) or {})
        self._lifecycle("instance-updated", key, who)

    def replace_instance(self, project: str, name: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        """PUT: the config becomes the one given (checked here; applied, limits live, in the operation)."""
        key = self._key(project, name)
        self.instances.get(key)
        config = records.validate_config(_config_of(body) or {})

        async def work() -> None:
            await self.instances.update_config(key, config, replace=True)
            self._lifecycle("instance-updated", key, who)

        return self._task(key, "Updating instance", who, work)

    def delete_instance(self, project: str, name: str, who: Identity) -> dict[str, Any]:
        key = self._key(project, name)
        inst = self.instances.get(key)
        if inst.status != "Stopped":
            raise BadRequest("Instance is running")

        async def work() -> None:
            await self.instances.delete(key)
            if self.on_instance_deleted is not None:
                self.on_instance_deleted(key)
            self._lifecycle("instance-deleted", key, who)

        return self._task(key, "Deleting instance", who, work)

    def change_state(self, project: str, name: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        key = self._key(project, name)
        self.instances.get(key)
        action = body.get("action")
        timeout = body.get("timeout", 30)
        force = bool(body.get("force", False))
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise BadRequest("Invalid timeout")
        grace = 0.0 if force else (float(timeout) if timeout >= 0 else 30.0)
        m = self.instances
        steps: dict[str, tuple[str, Any]] = {
            "start": ("Starting instance", lambda: m.start(key)),
            "stop": ("Stopping instance", lambda: m.stop(key, timeout=grace, force=force)),
            "freeze": ("Freezing instance", lambda: m.freeze(key)),
            "unfreeze": ("Unfreezing instance", lambda: m.unfreeze(key)),
        }
        events = {"start": "instance-started", "stop": "instance-stopped",
                  "freeze": "instance-paused", "unfreeze": "instance-resumed"}
        if action == "restart":
            async def work() -> None:
                if m.get(key).status != "Stopped":
                    await m.stop(key, timeout=grace, force=force)
                await m.start(key)
                self._lifecycle("instance-restarted", key, who)
            return self._task(key, "Restarting instance", who, work)
        if action not in steps:
            raise BadRequest(f'Unknown state action "{action}"')
        description, step = steps[action]

        async def work() -> None:
            await step()
            self._lifecycle(events[action], key, who)

        return self._task(key, description, who, work)

    # -- exec ---------------------------------------------------------------------------------------
    def exec(self, project: str, name: str, post: ExecPost, who: Identity) -> dict[str, Any]:
        """POST /1.0/instances/{name}/exec (validated by the front end) -> the rendered operation."""
        return self.execs.start(self._key(project, name), post, who)

    async def exec_capture(self, project: str, name: str, post: ExecPost, who: Identity, limit: int) -> dict[str, Any]:
        """One instance's share of a fan-out exec: run to the end, output captured (bounded)."""
        return await self.execs.capture(self._key(project, name), post, who, limit)

    def exec_output_list(self, project: str, name: str) -> list[str]:
        return self.execs.output_list(self._key(project, name))

    def exec_output_open(self, project: str, name: str, filename: str) -> int:
        return self.execs.output_open(self._key(project, name), filename)

    def exec_output_read(self, project: str, name: str, filename: str) -> bytes:
        """A recorded file's content (for another member, which cannot stream our fd)."""
        with os.fdopen(self.exec_output_open(project, name, filename), "rb") as f:
            return f.read()

    def exec_output_delete(self, project: str, name: str, filename: str) -> None:
        self.execs.output_delete(self._key(project, name), filename)

    # -- files (local only: another member relays the HTTP request itself, streamed) --------------------
    async def file_get(self, project: str, name: str, path: str, who: Identity, head: bool = False) -> Download:
        return await self.files.get(self._key(project, name), path, who, head)

    async def file_push(self, project: str, name: str, path: str, spec: PushSpec, body: AsyncIterator[bytes],
                        who: Identity) -> None:
        await self.files.push(self._key(project, name), path, spec, body, who)

    async def file_delete(self, project: str, name: str, path: str, who: Identity) -> None:
        await self.files.delete(self._key(project, name), path, who)

    async def audit_records(self, limit: int, project: str | None, who: Identity) -> list[dict[str, Any]]:
        """The last ``limit`` exec audit records of this member, of ``project`` (None: every project
        ``who`` may see)."""
        limit = max(1, min(int(limit), MAX_LIMIT))
        allows = (lambda p: p == project) if project is not None else who.allows
        return await asyncio.to_thread(self.audit.tail, limit, allows)

    def metrics_text(self, who: Identity, others: list[list[Any]] | None = None) -> str:
        """``GET /1.0/metrics`` of this member (OpenMetrics text), instances of ``who``'s projects;
        ``others``: what this node's worker processes counted (``metrics_samples``)."""
        return self.metrics.render(who.allows if who.restricted else None, others or []).decode()

    def metrics_samples(self) -> list[Any]:
        """This process's own counters, for its agent's ``metrics_text`` (a worker process)."""
        return self.metrics.samples()

    def inventory(self) -> list[str]:
        """What this node owns, for the directory: its instance keys."""
        return [records.key(i.project, i.name) for i in self.instances.list()]

    def has_operation(self, op_id: str) -> bool:
        """Whether this member runs (or still keeps) ``op_id``: a member that has not heard of it asks."""
        try:
            self.ops.get(op_id)
        except NotFound:
            return False
        return True

    def projects_in_use(self) -> dict[str, list[str]]:
        """project -> the URLs of its instances here (``used_by``)."""
        used: dict[str, list[str]] = {}
        for inst in sorted(self.instances.list(), key=lambda i: i.name):
            used.setdefault(inst.project, []).append(instance_url(inst.name, inst.project))
        return used

    # -- operations ---------------------------------------------------------------------------------
    def _op(self, op_id: str, who: Identity) -> Operation:
        op = self.ops.get(op_id)
        if not who.allows(op.project):
            raise NotFound("Operation not found")
        return op

    def list_operations(self, project: str | None, recursion: int, who: Identity) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for op in self.ops.list(project):
            if who.allows(op.project):
                out.setdefault(op.status.text.lower(), []).append(render(op) if recursion else op.url)
        return out

    def get_operation(self, op_id: str, who: Identity) -> dict[str, Any]:
        return render(self._op(op_id, who))

    async def wait_operation(self, op_id: str, timeout: float | None, who: Identity) -> dict[str, Any]:
        self._op(op_id, who)
        return render(await self.ops.wait(op_id, timeout))

    async def cancel_operation(self, op_id: str, who: Identity) -> None:
        self._op(op_id, who)
        await self.ops.cancel(op_id)

    def claim_websocket(self, op_id: str, secret: str, who: Identity,
                        offset: int | None = None) -> tuple[Session, str]:
        """All checks of spec §4.4, before the upgrade; the caller must attach or release."""
        return self.execs.claim_websocket(self._op(op_id, who), secret, who, offset)

    # -- events -------------------------------------------------------------------------------------
    def subscribe(self, types: str | None, project: str | None) -> Listener:
        wanted = [t for t in (types or "").split(",") if t] or sorted(ev.EVENT_TYPES)
        for t in wanted:
            if t not in ev.EVENT_TYPES:
                raise BadRequest(f'"{t}" isn\'t a supported event type')
        return self.hub.subscribe(wanted, project)

    def unsubscribe(self, listener: Listener) -> None:
        self.hub.unsubscribe(listener)


def default_server_name() -> str:
    return socket.gethostname()


def _config_of(body: dict[str, Any]) -> dict[str, str] | None:
    config = body.get("config")
    if config is not None and (not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values())):
        raise BadRequest("Invalid config: values must be strings")
    return config
