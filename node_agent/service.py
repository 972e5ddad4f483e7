"""NodeService: everything one node answers for, as plain methods returning Incus wire JSON.

The HTTP layer (api/) calls this; the Ray actor (node_agent/agent.py) owns one. No HTTP here.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import events as ev
from broker.errors import ApiError, BadRequest
from broker.events import EventHub, Listener
from broker.execspec import ExecPost, build_environment, exit_result
from broker.identity import Identity
from broker.operations import Operation, OperationRegistry, Status, render
from node_agent import exec_output
from node_agent.fdio import close_quietly
from node_agent.instances import Instance, InstanceManager
from node_agent.render import instance_url, render_instance, render_state
from node_agent.session import ExecSession
from node_agent.spawn import Process, SpawnRequest

API_EXTENSIONS = [
    "container_exec_recording", "container_exec_signal_handling", "container_exec_user_group_cwd",
    "instances", "projects", "operation_description", "event_lifecycle", "event_location",
    "event_project", "operations_get_query_all_projects", "operation_wait", "api_filtering", "clustering", "container_full", "instance_get_full",
]
VERSION = "0.1.0"


def check_instance_name(name: str) -> None:
    if "/" in name:
        raise BadRequest("Invalid instance name")


class NodeService:
    def __init__(self, data_dir: Path, server_name: str, clustered: bool = False,
                 driver: str = "auto", retention: float = 5.0) -> None:
        self.data_dir = data_dir
        self.server_name = server_name
        self.hub = EventHub()
        self.ops = OperationRegistry("none", self._op_changed, retention, on_expire=self._op_expired)
        self.clustered = False
        self.set_clustered(clustered)
        # Cluster hooks (node_agent/cluster_link.py): directory bookkeeping of what this node owns.
        self.on_op_created: Callable[[str], None] | None = None
        self.on_op_expired: Callable[[str], None] | None = None
        self.on_instance_deleted: Callable[[str], None] | None = None
        # One freezer cgroup tree per data dir: two brokers on a host may use the same instance names.
        tree = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
        self.instances = InstanceManager(data_dir, driver=driver, cgroup_parent=f"execbroker-{tree}")
        self.sessions: dict[str, ExecSession] = {}

    def start(self) -> None:
        self.instances.adopt()

    async def close(self) -> None:
        await self.ops.close()
        self.hub.close()

    def _op_changed(self, op: Operation) -> None:
        if op.status == Status.PENDING and self.on_op_created is not None:
            self.on_op_created(op.id)
        self.hub.publish("operation", render(op), project=op.project)
        if op.status.final:
            self.sessions.pop(op.id, None)

    def _op_expired(self, op_id: str) -> None:
        if self.on_op_expired is not None:
            self.on_op_expired(op_id)

    def _lifecycle(self, action: str, name: str, requestor: Identity | None,
                   context: dict[str, Any] | None = None) -> None:
        self.hub.publish("lifecycle", ev.lifecycle(action, instance_url(name),
                                                   requestor.to_json() if requestor else None, context))

    def set_clustered(self, clustered: bool) -> None:
        """A node is a cluster member (``location`` = its name) once it was told so or a peer joined."""
        self.clustered = self.clustered or clustered
        self.location = self.server_name if self.clustered else "none"
        self.hub.location = self.ops.location = self.location

    def local_identity(self) -> Identity:
        """The node acting on its own behalf (e.g. creating the default instance)."""
        return Identity(username="root", protocol="unix")

    # -- server -------------------------------------------------------------------------------------
    def server_info(self, who: Identity) -> dict[str, Any]:
        uname = os.uname()
        return {
            "config": {},
            "api_extensions": API_EXTENSIONS,
            "api_status": "stable",
            "api_version": "1.0",
            "auth": "trusted",
            "public": False,
            "auth_methods": ["tls"],
            "auth_user_name": who.username,
            "auth_user_method": who.protocol,
            "environment": {
                "addresses": [],
                "architectures": [platform.machine()],
                "certificate": "",
                "certificate_fingerprint": "",
                "driver": "execbroker",
                "driver_version": self.instances.driver_name,
                "firewall": "",
                "kernel": uname.sysname,
                "kernel_architecture": uname.machine,
                "kernel_features": {},
                "kernel_version": uname.release,
                "lxc_features": {},
                "os_name": "execbroker",
                "os_version": VERSION,
                "project": "default",
                "server": "execbroker",
                "server_clustered": self.clustered,
                "server_event_mode": "full-mesh",
                "server_name": self.server_name,
                "server_pid": os.getpid(),
                "server_version": VERSION,
                "storage": "dir",
                "storage_version": "1",
                "storage_supported_drivers": [],
            },
        }

    # -- instances ----------------------------------------------------------------------------------
    def list_instances(self, recursion: int) -> list[Any]:
        insts = sorted(self.instances.list(), key=lambda i: i.name)
        if recursion == 0:
            return [instance_url(i.name) for i in insts]
        return [render_instance(i, self.location, recursion) for i in insts]

    def get_instance(self, name: str, recursion: int = 1) -> dict[str, Any]:
        check_instance_name(name)
        return render_instance(self.instances.get(name), self.location, recursion)

    def get_instance_state(self, name: str) -> dict[str, Any]:
        check_instance_name(name)
        return render_state(self.instances.get(name))

    def _task(self, name: str, description: str, who: Identity, work: Any) -> dict[str, Any]:
        op = self.ops.create("task", description, {"instances": [instance_url(name)]}, {}, who)

        async def run(_op: Operation) -> None:
            await work()

        self.ops.start(op, run)
        return render(op)

    def create_instance(self, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Instance name is required")
        check_instance_name(name)
        source = body.get("source") or {}
        if not isinstance(source, dict):
            raise BadRequest("Invalid source")
        image = source.get("alias") or ("busybox" if source.get("type") in (None, "", "none", "image") else "")
        config = body.get("config") or {}
        if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
            raise BadRequest("Invalid config: values must be strings")
        self.instances.create(name, image=image, config=config)  # validation errors surface synchronously
        self._lifecycle("instance-created", name, who)
        start = bool(body.get("start"))

        async def work() -> None:
            if start:
                await self.instances.start(name)
                self._lifecycle("instance-started", name, who)

        return self._task(name, "Creating instance", who, work)

    def update_instance(self, name: str, body: dict[str, Any], who: Identity) -> None:
        check_instance_name(name)
        config = body.get("config")
        if config is not None and (not isinstance(config, dict)
                                   or not all(isinstance(v, str) for v in config.values())):
            raise BadRequest("Invalid config: values must be strings")
        self.instances.update_config(name, config or {})
        self._lifecycle("instance-updated", name, who)

    def delete_instance(self, name: str, who: Identity) -> dict[str, Any]:
        check_instance_name(name)
        inst = self.instances.get(name)
        if inst.status != "Stopped":
            raise BadRequest("Instance is running")

        async def work() -> None:
            await self.instances.delete(name)
            if self.on_instance_deleted is not None:
                self.on_instance_deleted(name)
            self._lifecycle("instance-deleted", name, who)

        return self._task(name, "Deleting instance", who, work)

    def change_state(self, name: str, body: dict[str, Any], who: Identity) -> dict[str, Any]:
        check_instance_name(name)
        self.instances.get(name)
        action = body.get("action")
        timeout = body.get("timeout", 30)
        force = bool(body.get("force", False))
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise BadRequest("Invalid timeout")
        grace = 0.0 if force else (float(timeout) if timeout >= 0 else 30.0)
        m = self.instances
        steps: dict[str, tuple[str, Any]] = {
            "start": ("Starting instance", lambda: m.start(name)),
            "stop": ("Stopping instance", lambda: m.stop(name, timeout=grace, force=force)),
            "freeze": ("Freezing instance", lambda: m.freeze(name)),
            "unfreeze": ("Unfreezing instance", lambda: m.unfreeze(name)),
        }
        events = {"start": "instance-started", "stop": "instance-stopped",
                  "freeze": "instance-paused", "unfreeze": "instance-resumed"}
        if action == "restart":
            async def work() -> None:
                if m.get(name).status != "Stopped":
                    await m.stop(name, timeout=grace, force=force)
                await m.start(name)
                self._lifecycle("instance-restarted", name, who)
            return self._task(name, "Restarting instance", who, work)
        if action not in steps:
            raise BadRequest(f'Unknown state action "{action}"')
        description, step = steps[action]

        async def work() -> None:
            await step()
            self._lifecycle(events[action], name, who)

        return self._task(name, description, who, work)

    # -- exec ---------------------------------------------------------------------------------------
    def _running_instance(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst.status == "Frozen":
            raise BadRequest("Instance is frozen")
        if inst.status != "Running":
            raise BadRequest("Instance is not running")
        return inst

    def exec(self, name: str, post: ExecPost, who: Identity) -> dict[str, Any]:
        """POST /1.0/instances/{name}/exec (validated by the front end) → the rendered operation."""
        check_instance_name(name)
        inst = self._running_instance(name)
        env = build_environment(post.environment, inst.config, post.user or 0,
                                lambda p: self.instances.path_exists(name, p))
        resources = {"instances": [instance_url(name)]}
        if post.wait_for_websocket:
            return self._exec_websocket(name, post, env, resources, who)
        return self._exec_task(name, post, env, {**resources, "containers": resources["instances"]}, who)

    def _exec_websocket(self, name: str, post: ExecPost, env: dict[str, str],
                        resources: dict[str, list[str]], who: Identity) -> dict[str, Any]:
        session = ExecSession(
            post, env,
            spawn=lambda req, fds: self.instances.spawn(name, req, fds),
            open_pty=lambda: self.instances.open_pty(name),
            on_started=lambda: self._lifecycle("instance-exec", name, who, {"command": post.command}),
        )
        op = self.ops.create("websocket", "Executing command", resources, session.metadata(), who,
                             may_cancel=True)
        self.sessions[op.id] = session
        self.ops.start(op, session.run, session.cancel)
        return render(op)

    def _exec_task(self, name: str, post: ExecPost, env: dict[str, str],
                   resources: dict[str, list[str]], who: Identity) -> dict[str, Any]:
        op = self.ops.create("task", "Executing command", resources, {}, who, may_cancel=True)
        proc: list[Process] = []

        async def run(op: Operation) -> None:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            out = err = devnull
            meta: dict[str, Any] = {}
            try:
                if post.record_output:
                    directory = self.instances.exec_output_dir(name)
                    out, err, out_name, err_name = exec_output.create_files(directory, op.id)
                    base = f"/1.0/instances/{name}/logs/exec-output"
                    meta["output"] = {"1": f"{base}/{out_name}", "2": f"{base}/{err_name}"}
                req = SpawnRequest(argv=list(post.command), env=env, cwd=post.cwd or "",
                                   uid=post.user or 0, gid=post.group or 0)
                try:
                    p = await self.instances.spawn(name, req, (devnull, out, err))
                except Exception as exc:
                    raise ApiError(str(exc)) from None
            finally:
                close_quietly(*{devnull, out, err})
            proc.append(p)
            self._lifecycle("instance-exec", name, who, {"command": post.command})
            try:
                code = await p.wait()
            finally:
                p.close()
            result = exit_result(code)
            op.extend_metadata({**meta, "return": result.code})
            if result.error:
                raise ApiError(result.error)

        async def cancel() -> None:
            for p in proc:
                p.kill_group()

        self.ops.start(op, run, cancel)
        return render(op)

    def exec_output_list(self, name: str) -> list[str]:
        check_instance_name(name)
        self.instances.get(name)
        directory = self.instances.exec_output_dir(name)
        return [f"/1.0/instances/{name}/logs/exec-output/{f}" for f in exec_output.list_files(directory)]

    def exec_output_open(self, name: str, filename: str) -> int:
        check_instance_name(name)
        self.instances.get(name)
        return exec_output.open_file(self.instances.exec_output_dir(name), filename)

    def exec_output_read(self, name: str, filename: str) -> bytes:
        """A recorded file's content (for another member, which cannot stream our fd)."""
        with os.fdopen(self.exec_output_open(name, filename), "rb") as f:
            return f.read()

    def inventory(self) -> tuple[list[str], list[str]]:
        """What this node owns, for the directory: instance names and live operation ids."""
        return [i.name for i in self.instances.list()], [op.id for op in self.ops.list(None)]

    def exec_output_delete(self, name: str, filename: str) -> None:
        check_instance_name(name)
        self.instances.get(name)
        exec_output.delete_file(self.instances.exec_output_dir(name), filename)

    # -- operations ---------------------------------------------------------------------------------
    def list_operations(self, recursion: int, project: str | None) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for op in self.ops.list(project):
            out.setdefault(op.status.text.lower(), []).append(render(op) if recursion else op.url)
        return out

    def get_operation(self, op_id: str) -> dict[str, Any]:
        return render(self.ops.get(op_id))

    async def wait_operation(self, op_id: str, timeout: float | None) -> dict[str, Any]:
        return render(await self.ops.wait(op_id, timeout))

    async def cancel_operation(self, op_id: str) -> None:
        await self.ops.cancel(op_id)

    def claim_websocket(self, op_id: str, secret: str, who: Identity) -> tuple[ExecSession, str]:
        """All checks of spec §4.4, before the upgrade; the caller must attach or release."""
        op = self.ops.get(op_id)
        if op.cls != "websocket":
            raise ApiError("Only websocket operations can be connected", 500)
        if op.status != Status.RUNNING:
            raise ApiError("Only running operations can be connected", 500)
        if not who.same_requestor(op.requestor):
            raise ApiError("Requestor mismatch", 403)
        session = self.sessions.get(op_id)
        if session is None:
            raise ApiError("Only running operations can be connected", 500)
        return session, session.claim(secret)

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

