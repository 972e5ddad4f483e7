"""Exec on one node (spec §3-§6): a websocket operation with an ExecSession, or a task operation whose
output goes to /dev/null or the record-output files; the websocket checks before an upgrade."""

from __future__ import annotations

import logging
import os
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core import projects, timefmt, workers
from core.errors import ApiError, BadRequest, SpawnError, Unavailable
from core.execspec import ExecPost, ExitResult, build_environment
from core.identity import Identity
from core.operations import Operation, OperationRegistry, Status, render
from node_agent import capture, exec_output
from node_agent.asciicast import Recorder
from node_agent.audit import AuditLog
from node_agent.deadline import Deadline, outcome
from node_agent.detached import DetachedSession
from node_agent.fdio import close_quietly
from node_agent.metrics import Metrics, exec_mode
from node_agent.render import instance_url
from node_agent.runtime.instances import Instance, InstanceManager
from node_agent.runtime.records import split_key
from node_agent.runtime.spawn import Process, SpawnRequest
from node_agent.session import ExecSession

Session = ExecSession | DetachedSession

log = logging.getLogger(__name__)

# (action, instance, requestor, context): a lifecycle event
Lifecycle = Callable[[str, str, "Identity | None", "dict[str, Any] | None"], None]


@dataclass
class _Live:
    """What the audit record of an exec needs, kept from its start to its end."""

    key: str
    post: ExecPost
    who: Identity
    mode: str
    started_at: datetime = field(default_factory=timefmt.now)


class Execs:
    def __init__(self, instances: InstanceManager, ops: OperationRegistry, lifecycle: Lifecycle,
                 metrics: Metrics, audit: AuditLog, member: Callable[[], str]) -> None:
        self.instances = instances
        self.ops = ops
        self._lifecycle = lifecycle
        self.metrics = metrics
        self.audit = audit
        self._member = member
        self.sessions: dict[str, Session] = {}  # websocket operation id -> its session, until it ends
        self.replays: dict[str, DetachedSession] = {}  # ended detachable execs, until their operation expires
        self._live: dict[str, _Live] = {}  # exec operation id -> what its audit record needs, until it ends
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_budget = nofile - workers.FD_RESERVE  # what live execs may hold of this process's fds
        self.capacity = workers.capacity_of(nofile)  # live execs this process takes (a node's balancing)
        metrics.sessions.set_function(lambda: len(self.sessions))
        self._bytes_in = metrics.relayed_bytes.labels("in").inc
        self._bytes_out = metrics.relayed_bytes.labels("out").inc

    def finished(self, op: Operation) -> None:
        session = self.sessions.pop(op.id, None)
        if isinstance(session, DetachedSession):
            self.replays[op.id] = session
        live = self._live.pop(op.id, None)
        if live is None:
            return
        result = {Status.SUCCESS: "success", Status.CANCELLED: "cancelled"}.get(op.status, "failure")
        self.metrics.execs_finished.labels(live.mode, result).inc()
        self._audit(op.id, live, op.status.text, op.metadata.get("return"), op.err,
                    session.bytes_in if session else 0, session.bytes_out if session else 0)

    def _audit(self, op_id: str, live: _Live, status: str, code: Any, error: str, bytes_in: int,
               bytes_out: int) -> None:
        """The exec's line in this member's audit log (exec_audit)."""
        project, name = split_key(live.key)
        record = {
            "operation": op_id, "member": self._member(), "project": project, "instance": name,
            "requestor": live.who.to_json(), "command": live.post.command, "mode": live.mode,
            "started_at": timefmt.rfc3339(live.started_at), "ended_at": timefmt.rfc3339(timefmt.now()),
            "status": status, "return": code, "error": error, "bytes_in": bytes_in, "bytes_out": bytes_out,
        }
        try:
            self.audit.append(record)
        except OSError as exc:
            log.error("exec audit: cannot append to %s: %s", self.audit.path, exc)

    async def _spawn(self, name: str, req: SpawnRequest, fds: tuple[int, ...]) -> Process:
        started = time.perf_counter()
        process = await self.instances.spawn(name, req, fds)
        self.metrics.exec_start_seconds.observe(time.perf_counter() - started)
        return process

    def _running_instance(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst.status == "Frozen":
            raise BadRequest("Instance is frozen")
        if inst.status != "Running":
            raise BadRequest("Instance is not running")
        return inst

    def _check_room(self, websocket: bool) -> None:
        """A process has only its RLIMIT_NOFILE of file descriptors: past what its live execs may hold (a
        websocket session ~7, a task 1), a clear 503 instead of failures deep inside (accept, pipe, spawn)."""
        tasks = len(self._live) - len(self.sessions)
        used = workers.SESSION_FDS * len(self.sessions) + tasks
        if used + (workers.SESSION_FDS if websocket else 1) > self._fd_budget:
            raise Unavailable(f"No room for another exec in this process: {len(self.sessions)} sessions and "
                              f"{tasks} tasks hold what its {self._fd_budget + workers.FD_RESERVE} file "
                              "descriptors allow (RLIMIT_NOFILE; more processes: execbroker up --workers)")

    def start(self, key: str, post: ExecPost, who: Identity) -> dict[str, Any]:
        """Create and start the exec operation on instance ``key``; returns it rendered."""
        inst = self._running_instance(key)
        self._check_room(post.wait_for_websocket)
        if (post.record_session or post.record_stdin) and not post.wait_for_websocket:
            raise BadRequest("record-session needs wait-for-websocket (use record-output for a task)")
        if post.detachable and not post.wait_for_websocket:
            raise BadRequest("detachable needs wait-for-websocket (a task runs without clients anyway)")
        if post.buffer_size is not None and not post.detachable:
            raise BadRequest("buffer-size is for detachable execs only")
        env = build_environment(post.environment, inst.config, post.user or 0,
                                lambda p: self.instances.path_exists(key, p))
        resources = {"instances": [instance_url(inst.name, inst.project)]}
        if post.wait_for_websocket:
            op = self._websocket(key, inst.project, post, env, resources, who)
        else:
            op = self._task(key, inst, post, env, {**resources, "containers": resources["instances"]}, who)
        mode = exec_mode(post)
        self._live[op["id"]] = _Live(key, post, who, mode)
        self.metrics.execs_started.labels(mode).inc()
        return op

    def _websocket(self, name: str, project: str, post: ExecPost, env: dict[str, str],
                   resources: dict[str, list[str]], who: Identity) -> dict[str, Any]:
        kind = DetachedSession if post.detachable else ExecSession
        session = kind(
            post, env,
            spawn=lambda req, fds: self._spawn(name, req, fds),
            on_started=lambda: self._lifecycle("instance-exec", name, who, {"command": post.command}),
            count_in=self._bytes_in, count_out=self._bytes_out,
        )
        op = self.ops.create("websocket", "Executing command", resources, session.metadata(), who,
                             project=project, may_cancel=True)
        if post.record_output and isinstance(session, DetachedSession):  # the whole output, beside the buffers
            fds, urls = self._output_files(name, self.instances.get(name), op.id)
            session.outputs = dict(zip(("1", "2"), fds))
            op.extend_metadata({"output": urls})
        if post.record_session:
            (fd, cast), = exec_output.create_files(self.instances.exec_output_dir(name), op.id, ("cast",))
            session.recorder = Recorder(fd, post.width, post.height, post.command, env.get("TERM", ""),
                                        post.record_stdin)
            inst = self.instances.get(name)
            op.extend_metadata({"recording": output_url(inst, cast)})
        self.sessions[op.id] = session
        self.ops.start(op, session.run, session.cancel)
        return render(op)

    def _task(self, name: str, inst: Instance, post: ExecPost, env: dict[str, str],
              resources: dict[str, list[str]], who: Identity) -> dict[str, Any]:
        op = self.ops.create("task", "Executing command", resources, {}, who, project=inst.project,
                             may_cancel=True)
        proc: list[Process] = []
        cancelled: list[bool] = []  # a cancel that came before the spawn answered

        async def run(op: Operation) -> None:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            out = err = devnull
            meta: dict[str, Any] = {}
            try:
                if post.record_output:
                    (out, err), meta["output"] = self._output_files(name, inst, op.id)
                req = SpawnRequest(argv=list(post.command), env=env, cwd=post.cwd or "",
                                   uid=post.user or 0, gid=post.group or 0)
                try:
                    p = await self._spawn(name, req, (devnull, out, err))
                except Exception as exc:
                    raise ApiError(str(exc)) from None
            finally:
                close_quietly(*{devnull, out, err})
            proc.append(p)
            if cancelled:
                p.kill_group()
            self._lifecycle("instance-exec", name, who, {"command": post.command})
            deadline = Deadline(p, post.timeout) if post.timeout is not None else None
            try:
                code = await p.wait()
            finally:
                if deadline is not None:
                    deadline.cancel()
                p.close()
            result = outcome(deadline, code)
            op.extend_metadata({**meta, "return": result.code})
            if result.error:
                raise ApiError(result.error)

        async def cancel() -> None:
            cancelled.append(True)
            for p in proc:
                p.kill_group()

        self.ops.start(op, run, cancel)
        return render(op)

    def claim_websocket(self, op: Operation, secret: str, who: Identity,
                        offset: int | None = None) -> tuple[Session, str]:
        """All checks of spec §4.4, before the upgrade; the caller must attach or release. A detachable
        exec's output stays readable from ``offset`` after it ended, until the operation expires."""
        if op.cls != "websocket":
            raise ApiError("Only websocket operations can be connected", 500)
        replay = self.replays.get(op.id)
        if op.status != Status.RUNNING and replay is None:
            raise ApiError("Only running operations can be connected", 500)
        if not who.same_requestor(op.requestor):
            raise ApiError("Requestor mismatch", 403)
        session = self.sessions.get(op.id) or replay
        if session is None:
            raise ApiError("Only running operations can be connected", 500)
        if isinstance(session, DetachedSession):
            return session, session.claim(secret, offset)
        if offset is not None:
            raise BadRequest("offset is for detachable execs only")
        return session, session.claim(secret)

    async def capture(self, key: str, post: ExecPost, who: Identity, limit: int) -> dict[str, Any]:
        """Run ``post`` (a task) on instance ``key`` to its end: the fan-out result of this instance."""
        inst = self._running_instance(key)
        env = build_environment(post.environment, inst.config, post.user or 0,
                                lambda p: self.instances.path_exists(key, p))
        live = _Live(key, post, who, "fanout")
        self.metrics.execs_started.labels("fanout").inc()
        files, urls = None, None
        if post.record_output:
            files, urls = self._output_files(key, inst, str(uuid.uuid4()))
        try:
            got = await capture.run(lambda req, fds: self._spawn(key, req, fds), post, env, limit, files)
        except SpawnError as exc:
            got = capture.Captured(ExitResult(-1, str(exc)), b"", b"", False)
        finally:
            if files is not None:
                close_quietly(*files)
        self._lifecycle("instance-exec", key, who, {"command": post.command})
        status = "Failure" if got.result.error else "Success"
        self.metrics.execs_finished.labels("fanout", status.lower()).inc()
        record = {"status": status, "return": got.result.code, "error": got.result.error,
                  "stdout": got.stdout.decode(errors="replace"), "stderr": got.stderr.decode(errors="replace"),
                  "truncated": got.truncated, "member": self._member(),
                  "started_at": timefmt.rfc3339(live.started_at), "ended_at": timefmt.rfc3339(timefmt.now())}
        if urls is not None:
            record["output"] = urls
        self._audit("", live, status, got.result.code, got.result.error, 0, got.produced)
        return record

    def _output_files(self, key: str, inst: Instance, name: str) -> tuple[tuple[int, int], dict[str, str]]:
        """record-output: the stdout and stderr files ``exec_<name>.*`` (fds, the caller's to close) and
        their URLs, by stream."""
        (out, out_name), (err, err_name) = exec_output.create_files(self.instances.exec_output_dir(key), name)
        return (out, err), {"1": output_url(inst, out_name), "2": output_url(inst, err_name)}

    def expired(self, op_id: str) -> None:
        """The operation left the registry: a detachable exec's buffers go with it."""
        self.replays.pop(op_id, None)

    # -- record-output files (spec §6) ----------------------------------------------------------------
    def output_list(self, name: str) -> list[str]:
        inst = self.instances.get(name)
        directory = self.instances.exec_output_dir(name)
        return [output_url(inst, f) for f in exec_output.list_files(directory)]

    def output_open(self, name: str, filename: str) -> int:
        self.instances.get(name)
        return exec_output.open_file(self.instances.exec_output_dir(name), filename)

    def output_delete(self, name: str, filename: str) -> None:
        self.instances.get(name)
        exec_output.delete_file(self.instances.exec_output_dir(name), filename)


def output_url(inst: Instance, filename: str) -> str:
    return f"/1.0/instances/{inst.name}/logs/exec-output/{filename}{projects.query_suffix(inst.project)}"
