"""Instances of one node: create, start, stop, freeze, delete, and spawn commands inside them.

Instances are addressed by key: the name in the default project, ``<project>_<name>`` in another
(``records.key``); every method takes the key but ``create``, which takes the name and the project.
On disk, under ``<data_dir>/instances/<key>/``:

* ``instance.json``: name, image, config, created_at, last_used_at (the instance's definition);
* ``state.json``: pid1's host pid and start time while it runs, so a restarted agent re-adopts it;
* ``rootfs/``, ``spawn.sock`` (pid1's spawn socket), ``pid1.json`` (its start config), ``pid1.log``;
* ``exec-output/``: recorded output of exec (created by the exec layer).

Drivers: ``namespaces`` (pid/mount/uts/ipc namespaces + chroot, the default as root) and ``process`` (no
isolation at all, for development machines without root). Both run the same pid1 program.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import struct
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from core.errors import ApiError, BadRequest, Conflict, NotFound
from node_agent.runtime import launcher, records, rootfs
from node_agent.runtime.cgroups import Freezer
from node_agent.runtime.pid1.server import SOCKET_NAME
from node_agent.runtime.records import KEY_RE, Driver, Record, now, validate_config, validate_name
from node_agent.runtime.spawn import Process, SpawnRequest, spawn

log = logging.getLogger(__name__)

InstanceStatus = Literal["Running", "Stopped", "Frozen", "Error"]
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
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


class InstanceManager:
    def __init__(self, data_dir: Path, driver: str = "auto", cgroup_parent: str = "execbroker") -> None:
        self.data_dir = Path(data_dir)
        self._root = self.data_dir / "instances"
        self._cgroup_parent = cgroup_parent
        self._records: dict[str, Record] = {}
        self._loaded = False
        self.driver_name: Driver = self._choose_driver(driver)

    @staticmethod
    def _choose_driver(driver: str) -> Driver:
        if driver == "auto":
            driver = "namespaces" if launcher.probe_namespaces() else "process"
        if driver == "process":
            msg = "execbroker: using the 'process' instance driver: commands run on the host without isolation"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
        elif driver != "namespaces":
            raise ValueError(f"Unknown instance driver {driver!r}")
        return driver  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------- queries

    def adopt(self) -> None:
        """Load every instance from disk; pid1s still running (same pid and start time) are Running."""
        self._root.mkdir(parents=True, exist_ok=True)
        self._records = {}
        for entry in sorted(self._root.iterdir()):
            if entry.is_dir() and KEY_RE.fullmatch(entry.name):
                rec = records.load(self._dir(entry.name), entry.name)
                self._refresh(rec)
                self._records[entry.name] = rec
        self._loaded = True

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
        """Whether ``path`` (absolute, as seen inside the instance) exists there."""
        rec = self._record(name)
        inside = "/" + path.lstrip("/")
        if self._refresh(rec) and rec.pid1 is not None:
            return os.path.lexists(inside if rec.driver == "process" else f"/proc/{rec.pid1.pid}/root{inside}")
        if self.driver_name == "process":
            return os.path.lexists(inside)
        return os.path.lexists(rootfs.path_in_rootfs(self._dir(name) / "rootfs", rec.image, inside))

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
                        rec.pid1.pid if rec.pid1 else None, rec.last_used_at, project)

    # ------------------------------------------------------------------------------------ changes

    def create(self, name: str, image: str = "busybox", config: dict[str, str] | None = None,
               project: str = records.DEFAULT_PROJECT) -> Instance:
        validate_name(name)
        name = records.key(project, name)
        if image not in rootfs.IMAGES:
            raise BadRequest(f'Unknown image "{image}" (available: {", ".join(rootfs.IMAGES)})')
        cfg = validate_config(config or {})
        self._ensure_loaded()
        path = self._dir(name)
        if name in self._records or path.exists():
            raise Conflict(f'Instance "{records.split_key(name)[1]}" already exists')
        staging = self._root / f".{name}.creating"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            rootfs.build_rootfs(image, staging / "rootfs", hostname=records.split_key(name)[1])
        except rootfs.RootfsError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ApiError(str(exc)) from None
        rec = Record(name, image, cfg, now())
        os.rename(staging, path)
        records.save(self._dir(rec.name), rec)
        self._records[name] = rec
        return self._snapshot(rec)

    def update_config(self, name: str, config: dict[str, str]) -> Instance:
        """PATCH semantics: the given keys are set, the others kept."""
        rec = self._record(name)
        rec.config.update(validate_config(config))
        records.save(self._dir(rec.name), rec)
        return self._snapshot(rec)

    async def start(self, name: str) -> Instance:
        rec = self._record(name)
        async with rec.lock:
            status = self._status(rec)
            if status in ("Running", "Frozen"):
                raise BadRequest("The instance is already running")
            if status == "Error":
                raise BadRequest(rec.broken or "The instance is broken")
            path = self._dir(name)
            freezer = self._freezer(name)
            if freezer is not None:
                freezer.create()
                freezer.kill_all()  # leftovers of an earlier run (process driver) must not linger
            config = {
                "name": records.split_key(name)[1],  # the hostname inside
                "isolation": self.driver_name,
                "instance_dir": str(path),
                "rootfs": str(path / "rootfs"),
                "binds": [asdict(b) for b in rootfs.image_binds(rec.image)],
                "cgroup_procs": str(freezer.procs_file) if freezer is not None else None,
                "log": str(path / "pid1.log"),
            }
            records.write_json(path / "pid1.json", config)
            launch = asyncio.ensure_future(asyncio.to_thread(self._launch, rec))
            try:
                await asyncio.shield(launch)
            except asyncio.CancelledError:
                await asyncio.wait([launch])  # let it finish and be recorded: no instance runs unknown to us
                raise
            except launcher.LaunchError as exc:
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

    def _launch(self, rec: Record) -> None:
        """Start pid1 and record it (memory and state.json). Blocking: runs in a worker thread."""
        path = self._dir(rec.name)
        ident = launcher.launch(path / "pid1.json")
        records.save_state(path, ident, self.driver_name)
        rec.pid1, rec.driver = ident, self.driver_name

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
            if freezer is not None:
                await self._kill_leftovers(freezer)
            self._refresh(rec)
            return self._snapshot(rec)

    async def _kill_leftovers(self, freezer: Freezer) -> None:
        """Processes that escaped pid1's end (only possible without a pid namespace)."""
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
            if path.exists():  # gone already if another manager deleted it
                shutil.rmtree(path)
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

    def open_pty(self, name: str) -> tuple[int, int]:
        """(master, slave) from the instance's own devpts (so ``tty`` inside names /dev/pts/N), else from the
        host's. Both non-inheritable; the master is non-blocking. The caller owns and closes both."""
        rec = self._record(name)
        if rec.driver == "namespaces" and rec.pid1 is not None and self._refresh(rec):
            try:
                return _open_instance_pty(f"/proc/{rec.pid1.pid}/root/dev/pts/ptmx")
            except OSError as exc:
                log.debug("instance %s: falling back to a host PTY: %s", name, exc)
        master, slave = os.openpty()
        os.set_blocking(master, False)
        return master, slave

    async def spawn(self, name: str, req: SpawnRequest, fds: tuple[int, int, int]) -> Process:
        """Start ``req`` inside the instance with ``fds`` as stdin/stdout/stderr (see node_agent.runtime.spawn for
        who closes what). Raises SpawnError, or BadRequest if the instance is not running or frozen."""
        rec = self._record(name)
        if rec.pid1 is None:
            raise BadRequest("Instance is not running")
        freezer = self._freezer(name)
        if freezer is not None and freezer.is_frozen():
            raise BadRequest("Instance is frozen")  # pid1 could not answer
        process = await spawn(self._dir(name) / SOCKET_NAME, req, fds)
        rec.last_used_at = now()
        return process


def _open_instance_pty(ptmx: str) -> tuple[int, int]:
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        raise
    return master, slave

