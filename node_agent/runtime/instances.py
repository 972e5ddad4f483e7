"""Instances of one node: create, start, stop, freeze, delete, and spawn commands inside them.

Instances are addressed by key: the name in the default project, ``<project>_<name>`` in another
(``records.key``); every method takes the key but ``create``, which takes the name and the project.
On disk, under ``<data_dir>/instances/<key>/``:

* ``instance.json``: name, image, config, created_at, last_used_at, id_base (the instance's definition);
* ``state.json``: pid1's host pid and start time while it runs, so a restarted agent re-adopts it;
* ``rootfs/`` (owned by the instance's root, host uid ``id_base``), ``config.json`` (the OCI bundle),
  ``spawn.sock`` (pid1's spawn socket), ``pid1.log``;
* ``exec-output/``: recorded output of exec (created by the exec layer).

Drivers: ``oci`` (an unprivileged container under runc: user, pid, mount, network, ... namespaces,
seccomp, limits; the default as root) and ``process`` (no isolation at all, for development machines
without root). Both run the same pid1 program. Instances made by the runtime that came before containers
(``namespaces``, root inside was host root) are migrated: their rootfs is shifted into an id range of
their own when they next start, and those found running are restarted so (``migrate_legacy``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from core.errors import ApiError, BadRequest, Conflict, NotFound
from node_agent.runtime import (
    cgroups,
    idranges,
    idshift,
    images,
    instance_files,
    launcher,
    records,
    rootfs,
    runc,
)
from node_agent.runtime.cgroups import Freezer
from node_agent.runtime.container import ContainerRuntime, allocate_id_base
from node_agent.runtime.images import ImageStore, Progress
from node_agent.runtime.inroot import exists_in_root
from node_agent.runtime.instance_files import FileInfo
from node_agent.runtime.limits import Limits
from node_agent.runtime.pid1.server import SOCKET_NAME
from node_agent.runtime.records import KEY_RE, Driver, Record, now, validate_config, validate_name
from node_agent.runtime.spawn import Process, SpawnRequest, spawn

log = logging.getLogger(__name__)

InstanceStatus = Literal["Running", "Stopped", "Frozen", "Error"]
FREEZE_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0


@dataclass
class Instance:
    name: str
    image: str  # "busybox" | "host"
    config: dict[str, str]  # e.g. {"environment.FOO": "bar"}
    created_at: datetime
    status: InstanceStatus
    pid: int | None  # host pid of pid1 while running
    last_used_at: datetime | None
    project: str = records.DEFAULT_PROJECT
    id_base: int | None = None  # the host uid of root inside (None: not a container)


@dataclass(frozen=True)
class Reservation:
    """A new instance's name and id range, held while its rootfs is made."""

    key: str
    image: str
    config: dict[str, str]
    id_base: int | None


class InstanceManager:
    def __init__(self, data_dir: Path, driver: str = "auto", cgroup_parent: str = "execbroker",
                 image_store: ImageStore | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._root = self.data_dir / "instances"
        self._cgroup_parent = cgroup_parent
        self._records: dict[str, Record] = {}
        self._loaded = False
        self.driver_name: Driver = self._choose_driver(driver)
        self.containers = ContainerRuntime(self.data_dir, cgroup_parent)
        self.images = image_store or ImageStore()
        self._creating: dict[str, int] = {}  # keys being created -> the id base they hold (-1: none)
        self._ids: idranges.Range | None = None  # the host ids delegated to execbroker (oci)

    @staticmethod
    def _choose_driver(driver: str) -> Driver:
        if driver == "auto":
            driver = "oci" if os.geteuid() == 0 and runc.binary() is not None else "process"
        if driver == "process":
            msg = "execbroker: using the 'process' instance driver: commands run on the host without isolation"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
        elif driver != "oci":
            raise ValueError(f"Unknown instance driver {driver!r}")
        elif runc.binary() is None:
            raise ValueError("The oci driver needs runc (run deploy/system-deps.sh)")
        return driver  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------- queries

    def adopt(self) -> None:
        """Load every instance from disk; pid1s still running (same pid and start time) are Running."""
        self._root.mkdir(parents=True, exist_ok=True)
        if self.driver_name == "oci":
            self._open_path_to_rootfs()
            self._id_range()
        self._records = {}
        for entry in sorted(self._root.iterdir()):
            if entry.is_dir() and KEY_RE.fullmatch(entry.name):
                rec = records.load(self._dir(entry.name), entry.name)
                self._refresh(rec)
                self._records[entry.name] = rec
        self._loaded = True

    def _open_path_to_rootfs(self) -> None:
        """runc mounts an instance's rootfs as the instance's root (an unprivileged host uid): every directory
        on the way must let others pass (as LXD's ``/var/lib/lxd`` does: 0711, no listing). What lies
        there is private by its own mode: files 0600, an instance's directory root:<its root gid> 0710."""
        for path in (self.data_dir, self._root):
            mode = path.stat().st_mode
            if not mode & 0o001:
                os.chmod(path, (mode & 0o7777) | 0o111)
        for parent in self.data_dir.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise ValueError(f"{parent} must be searchable by others (o+x) for unprivileged containers "
                                 f"to reach their root filesystems below {self.data_dir}")

    def list(self) -> list[Instance]:
        self._ensure_loaded()
        return [self._snapshot(rec) for rec in self._records.values()]

    def get(self, name: str) -> Instance:
        return self._snapshot(self._record(name))

    def exists(self, name: str) -> bool:
        """Whether this node has ``name``, without working out its status (no /proc or cgroup reads)."""
        self._ensure_loaded()
        return name in self._records

    def exec_output_dir(self, name: str) -> Path:
        return self._dir(name) / "exec-output"

    def path_exists(self, name: str, path: str) -> bool:
        """Whether ``path`` (absolute, as seen inside the instance) exists there, resolved inside the
        instance's root whatever symlinks it holds (never out to the host's files)."""
        rec = self._record(name)
        inside = "/" + path.lstrip("/")
        if self._refresh(rec) and rec.pid1 is not None:
            if rec.driver == "process":
                return os.path.lexists(inside)
            return exists_in_root(f"/proc/{rec.pid1.pid}/root", inside)
        if self.driver_name == "process":
            return os.path.lexists(inside)
        host = rootfs.path_in_rootfs(self._dir(name) / "rootfs", rec.image, inside)
        if not str(host).startswith(str(self._dir(name) / "rootfs")):
            return os.path.lexists(host)  # under a read-only bind of a host directory
        return exists_in_root(str(self._dir(name) / "rootfs"), inside)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.adopt()

    def _dir(self, name: str) -> Path:
        return self._root / name

    def _record(self, name: str) -> Record:
        self._ensure_loaded()
        rec = self._records.get(name)
        if rec is None:
            raise NotFound("Instance not found")
        return rec

    def _freezer(self, name: str) -> Freezer | None:
        return Freezer.for_instance(self._cgroup_parent, name)

    def _refresh(self, rec: Record) -> bool:
        """True if pid1 runs; forgets a pid1 that is gone (and its leftovers)."""
        if rec.pid1 is None:
            return False
        if launcher.is_alive(rec.pid1):
            return True
        rec.pid1 = None
        for leftover in ("state.json", SOCKET_NAME):
            try:
                (self._dir(rec.name) / leftover).unlink()
            except FileNotFoundError:
                pass
        return False

    def _status(self, rec: Record) -> InstanceStatus:
        if rec.broken:
            return "Error"
        if not self._refresh(rec):
            return "Stopped"
        freezer = self._freezer(rec.name)
        return "Frozen" if freezer is not None and freezer.is_frozen() else "Running"

    def _snapshot(self, rec: Record) -> Instance:
        status = self._status(rec)
        project, name = records.split_key(rec.name)
        return Instance(name, rec.image, dict(rec.config), rec.created_at, status,
                        rec.pid1.pid if rec.pid1 else None, rec.last_used_at, project, rec.id_base)

    def usage(self, name: str) -> dict[str, int | None]:
        """What the instance uses now (memory, CPU time, processes), from its cgroups."""
        rec = self._record(name)
        if not self._refresh(rec):
            return {"memory": 0, "memory_peak": 0, "cpu_ns": 0, "processes": 0}
        return cgroups.usage(self.containers.cgroup_path(name))

    def figures(self, name: str) -> cgroups.Figures | None:
        """The instance's metrics from its cgroups (None when it is not running)."""
        rec = self._record(name)
        if not self._refresh(rec):
            return None
        return cgroups.figures(self.containers.cgroup_path(name), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    # ------------------------------------------------------------------------------------ changes

    def create(self, name: str, image: str = "busybox", config: dict[str, str] | None = None,
               project: str = records.DEFAULT_PROJECT) -> Instance:
        """Create a stopped instance from an image that needs no build (busybox, host, or a built debian)."""
        res = self.reserve(name, image, config, project)
        try:
            staged = self._populate(res)
        finally:
            self.release(res)
        return self._register(res, staged)

    def reserve(self, name: str, image: str, config: dict[str, str] | None = None,
                project: str = records.DEFAULT_PROJECT) -> Reservation:
        """Check a new instance (BadRequest, Conflict) and take its name and id range until ``release``."""
        validate_name(name)
        key = records.key(project, name)
        if image not in images.NAMES:
            raise BadRequest(f'Unknown image "{image}" (available: {", ".join(images.NAMES)})')
        cfg = validate_config(config or {})
        self._ensure_loaded()
        if key in self._records or key in self._creating or self._dir(key).exists():
            raise Conflict(f'Instance "{name}" already exists')
        id_base = None
        if self.driver_name == "oci":
            try:
                id_base = allocate_id_base(self._used_id_bases(), self._id_range())
            except launcher.LaunchError as exc:
                raise ApiError(str(exc)) from None
        self._creating[key] = id_base if id_base is not None else -1
        return Reservation(key, image, cfg, id_base)

    def release(self, res: Reservation) -> None:
        self._creating.pop(res.key, None)

    async def create_reserved(self, res: Reservation, progress: Progress) -> Instance:
        """Create the reserved instance, building its image first if this host has not yet (``progress``
        hears how that goes); the reservation is released either way."""
        try:
            await self.images.prepare(res.image, progress)
            staged = await asyncio.to_thread(self._populate, res)
        finally:
            self.release(res)
        return self._register(res, staged)

    def _id_range(self) -> idranges.Range:
        if self._ids is None:
            self._ids = idranges.claim()
        return self._ids

    def _used_id_bases(self) -> set[int]:
        """Every range an instance of this node holds: recorded, being created, or (a definition that
        cannot be read) owning its rootfs."""
        used = {r.id_base for r in self._records.values() if r.id_base is not None} | set(self._creating.values())
        for rec in self._records.values():
            if rec.broken:
                try:
                    used.add((self._dir(rec.name) / "rootfs").stat().st_uid)
                except OSError:
                    pass
        return used

    def _populate(self, res: Reservation) -> Path:
        """The instance's directory, staged beside its final place: its rootfs, shifted into its id range."""
        key, image, id_base = res.key, res.image, res.id_base
        staging = self._root / f".{key}.creating"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700, parents=True)  # nobody else may enter it while it is filled
        try:
            self.images.populate(image, staging / "rootfs", hostname=records.split_key(key)[1])
            if id_base is not None:
                idshift.shift(staging / "rootfs", id_base)
            _private_dir(staging, id_base)
        except rootfs.RootfsError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ApiError(str(exc)) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _register(self, res: Reservation, staged: Path) -> Instance:
        rec = Record(res.key, res.image, res.config, now(), id_base=res.id_base)
        os.rename(staged, self._dir(res.key))
        records.save(self._dir(res.key), rec)
        self._records[res.key] = rec
        return self._snapshot(rec)

    async def update_config(self, name: str, config: dict[str, str], replace: bool = False) -> Instance:
        """The given keys are set, the others kept (PATCH), or the config becomes ``config`` (``replace``:
        PUT); changed limits apply live to a running container."""
        rec = self._record(name)
        async with rec.lock:
            merged = validate_config(dict(config) if replace else {**rec.config, **validate_config(config)})
            limits_changed = Limits.from_config(merged) != Limits.from_config(rec.config)
            if rec.driver == "oci" and self._refresh(rec) and limits_changed:
                try:
                    await asyncio.to_thread(self.containers.update, name, merged)
                except launcher.LaunchError as exc:
                    raise ApiError(str(exc)) from None
            rec.config = merged
            records.save(self._dir(rec.name), rec)
            return self._snapshot(rec)

    async def migrate_legacy(self) -> list[str]:
        """Instances still running the runtime from before containers (root inside was host root): each is
        restarted as an unprivileged container, its rootfs shifted into an id range of its own. Returns
        their keys."""
        migrated = []
        for rec in list(self._records.values()):
            if rec.driver != "namespaces" or not self._refresh(rec) or self.driver_name != "oci":
                continue
            log.warning("instance %s runs the runtime from before unprivileged containers: restarting it as "
                        "one (root inside becomes an unprivileged host uid)", rec.name)
            await self.stop(rec.name, timeout=KILL_TIMEOUT)
            await self.start(rec.name)
            migrated.append(rec.name)
        return migrated

    async def start(self, name: str) -> Instance:
        rec = self._record(name)
        async with rec.lock:
            status = self._status(rec)
            if status in ("Running", "Frozen"):
                raise BadRequest("The instance is already running")
            if status == "Error":
                raise BadRequest(rec.broken or "The instance is broken")
            shift = self.driver_name == "oci" and rec.id_base is None  # made before containers: migrate
            if shift:
                try:  # taken here, on the loop, where every other allocation happens
                    rec.id_base = allocate_id_base(self._used_id_bases(), self._id_range())
                except launcher.LaunchError as exc:
                    raise ApiError(str(exc)) from None
            launch = asyncio.ensure_future(asyncio.to_thread(self._launch, rec, shift))
            try:
                await asyncio.shield(launch)
            except asyncio.CancelledError:
                await asyncio.wait([launch])  # let it finish and be recorded: no instance runs unknown to us
                raise
            except launcher.LaunchError as exc:
                if shift:  # what is on disk says whether the shift was recorded (it is safe to run again)
                    rec.id_base = records.load(self._dir(name), name).id_base
                raise ApiError(str(exc)) from None
            assert rec.pid1 is not None
            adopter = launcher.parent_pid(rec.pid1.pid)
            if adopter not in (None, 1):
                # A child subreaper (e.g. Ray's RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper)
                # adopted pid1 instead of init: the instance will die when that process exits.
                log.warning("instance %s: pid1 %d was adopted by subreaper %d; the instance will not outlive it",
                            name, rec.pid1.pid, adopter)
            rec.last_used_at = now()
            records.save(self._dir(rec.name), rec)
            return self._snapshot(rec)

    def _launch(self, rec: Record, shift: bool) -> None:
        """Start pid1 and record it (memory and state.json). Blocking: runs in a worker thread."""
        path = self._dir(rec.name)
        if self.driver_name == "oci":
            if shift:
                self._migrate(rec)
            ident = self.containers.start(rec.name, path, rec.id_base, rootfs.image_binds(rec.image),  # type: ignore[arg-type]
                                          rec.config)
        else:
            freezer = self._freezer(rec.name)
            if freezer is not None:
                freezer.create()
                freezer.kill_all()  # leftovers of an earlier run must not linger
            config = {"instance_dir": str(path), "log": str(path / "pid1.log"),
                      "cgroup_procs": str(freezer.procs_file) if freezer is not None else None}
            records.write_json(path / "pid1.json", config)
            ident = launcher.launch(path / "pid1.json")
        records.save_state(path, ident, self.driver_name)
        rec.pid1, rec.driver = ident, self.driver_name

    def _migrate(self, rec: Record) -> None:
        """An instance from before containers: its rootfs was host root's; shift it into the range it was
        given (``rec.id_base``). Running it again after a failure is safe: shifted files are left alone."""
        assert rec.id_base is not None
        try:
            changed = idshift.shift(self._dir(rec.name) / "rootfs", rec.id_base)
        except OSError as exc:
            raise launcher.LaunchError(f"Failed to start instance: cannot shift its files: {exc}") from None
        _private_dir(self._dir(rec.name), rec.id_base)
        records.save(self._dir(rec.name), rec)
        log.warning("instance %s: migrated to an unprivileged container: root inside is host uid %d now "
                    "(%d files shifted)", rec.name, rec.id_base, changed)

    async def stop(self, name: str, timeout: float = 10.0, force: bool = False) -> Instance:
        """SIGTERM pid1 (it passes SIGTERM on and exits once the instance is empty); SIGKILL after
        ``timeout`` seconds, or at once with ``force``. Every process of the instance is gone on return."""
        rec = self._record(name)
        async with rec.lock:
            if not self._refresh(rec) or rec.pid1 is None:
                raise BadRequest("The instance is already stopped")
            ident = rec.pid1
            freezer = self._freezer(name)
            if freezer is not None and freezer.is_frozen():
                await self._settle(freezer, frozen=False)  # frozen tasks cannot handle SIGTERM
            exited = False
            if not force and launcher.send_signal(ident, signal.SIGTERM):
                exited = await launcher.wait_exit(ident, timeout)
            if not exited:
                launcher.send_signal(ident, signal.SIGKILL)  # the kernel then kills the whole pid namespace
                if not await launcher.wait_exit(ident, KILL_TIMEOUT):
                    raise ApiError("Failed to stop the instance: pid1 did not exit after SIGKILL")
            if rec.driver == "oci":
                await asyncio.to_thread(self.containers.stop, name)
            elif freezer is not None:
                await self._kill_leftovers(freezer)
            self._refresh(rec)
            return self._snapshot(rec)

    async def _kill_leftovers(self, freezer: Freezer) -> None:
        """Processes that escaped pid1's end (only possible without a pid namespace: the process driver)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_TIMEOUT
        while freezer.pids() and loop.time() < deadline:
            freezer.kill_all()
            await asyncio.sleep(0.01)

    async def freeze(self, name: str) -> Instance:
        rec = self._record(name)
        async with rec.lock:
            status = self._status(rec)
            if status == "Frozen":
                raise BadRequest("The instance is already frozen")
            if status != "Running":
                raise BadRequest("The instance isn't running")
            freezer = self._freezer(name)
            if freezer is None:
                raise BadRequest("Freezing is not supported on this machine (no cgroup freezer)")
            await self._settle(freezer, frozen=True)
            return self._snapshot(rec)

    async def unfreeze(self, name: str) -> Instance:
        rec = self._record(name)
        async with rec.lock:
            freezer = self._freezer(name)
            if self._status(rec) != "Frozen" or freezer is None:
                raise BadRequest("The instance is not frozen")
            await self._settle(freezer, frozen=False)
            return self._snapshot(rec)

    async def _settle(self, freezer: Freezer, frozen: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FREEZE_TIMEOUT
        freezer.request(frozen)
        delay = 0.001
        while not freezer.settled(frozen):
            if loop.time() > deadline:
                if frozen:
                    freezer.request(False)
                raise ApiError(f"Failed to {'freeze' if frozen else 'unfreeze'} the instance: timed out")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def delete(self, name: str) -> None:
        rec = self._record(name)
        async with rec.lock:
            if self._status(rec) in ("Running", "Frozen"):
                raise BadRequest("Instance is running")
            path = self._dir(name)
            if self._mounts_below(path):  # never recurse into a host directory bind-mounted here
                raise ApiError(f"Cannot delete instance {name}: filesystems are still mounted below {path}")
            await asyncio.to_thread(self.containers.stop, name)  # runc's state, if a run left any
            if path.exists():  # gone already if another manager deleted it
                await asyncio.to_thread(shutil.rmtree, path)
            freezer = self._freezer(name)
            if freezer is not None:
                freezer.remove()
            del self._records[name]

    @staticmethod
    def _mounts_below(path: Path) -> bool:
        prefix = str(path.resolve()) + "/"
        try:
            with open("/proc/self/mountinfo") as f:
                return any(line.split()[4].startswith(prefix) for line in f)
        except OSError:
            return False

    # -------------------------------------------------------------------------------------- exec

    def _pid1_socket(self, name: str) -> Path:
        rec = self._record(name)
        if rec.pid1 is None:  # a pid1 that died since is found out by the connect
            raise BadRequest("Instance is not running")
        freezer = self._freezer(name)
        if freezer is not None and freezer.is_frozen():
            raise BadRequest("Instance is frozen")  # pid1 could not answer
        return self._dir(name) / SOCKET_NAME

    async def file(self, name: str, op: str, path: str, **args: Any) -> tuple[FileInfo, int | None]:
        """A file request (``instance_files``), done inside the instance by its pid1 while it runs, on its
        rootfs while it is stopped: what ``path`` is, and the open file or directory for ``open`` and
        ``write`` (the caller's to close)."""
        rec = self._record(name)
        if self._refresh(rec):
            info = await instance_files.request(self._pid1_socket(name), op, path, **args)
        else:  # stopped: on its rootfs, as the instance's root would
            info = await asyncio.to_thread(instance_files.on_rootfs, self._dir(name) / "rootfs", rec.id_base,
                                           op, path, **args)
        rec.last_used_at = now()
        return info

    async def spawn(self, name: str, req: SpawnRequest, fds: tuple[int, ...]) -> Process:
        """Start ``req`` inside the instance with ``fds`` as stdin/stdout/stderr, or on a new PTY (``req.pty``,
        no fds: ``Process.pty_master``); see node_agent.runtime.spawn for who closes what. Raises SpawnError,
        or BadRequest if the instance is not running or frozen."""
        process = await spawn(self._pid1_socket(name), req, fds)
        self._record(name).last_used_at = now()
        return process


def _private_dir(path: Path, id_base: int | None) -> None:
    """An instance's directory: root's; a container's root (group ``id_base``) may only pass to its rootfs."""
    if id_base is None:
        os.chmod(path, 0o700)
    else:
        os.chown(path, 0, id_base)
        os.chmod(path, 0o710)
