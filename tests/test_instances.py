"""Instance lifecycle: create/start/stop/freeze/delete, what an instance looks like from inside, re-adoption,
the host image, the process driver, and survival of a Ray cluster shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import BadRequest, Conflict, NotFound
from node_agent.runtime import cgroups
from node_agent.runtime.cgroups import Freezer
from node_agent.runtime.instances import InstanceManager
from node_agent.runtime.spawn import SpawnRequest
from tests.instance_fixtures import (  # noqa: F401
    CGROUP_PARENT,
    ENV,
    async_wait_for,
    c1,
    cleanup_manager,
    data_dir,
    leak_check,
    manager,
    needs_root,
    new_data_dir,
    pid_alive,
    processes_mentioning,
    run,
    spawn_piped,
    unique_name,
    wait_for,
)

pytestmark = [needs_root, pytest.mark.timeout(180)]


# ------------------------------------------------------------------------------------------- create


@pytest.mark.parametrize("name", ["", "1abc", "-abc", "abc-", "a_b", "a.b", "a/b", "é", "a" * 64])
def test_invalid_names(manager: InstanceManager, name: str) -> None:
    with pytest.raises(BadRequest, match="Invalid instance name"):
        manager.create(name)


@pytest.mark.parametrize("name", ["a", "c1", "my-instance-2", "A" * 63])
def test_valid_names(manager: InstanceManager, name: str) -> None:
    assert manager.create(name).name == name


def test_create(manager: InstanceManager, data_dir: Path) -> None:
    inst = manager.create("c1", config={"environment.FOO": "bar"})
    assert (inst.name, inst.image, inst.status, inst.pid, inst.last_used_at) == ("c1", "busybox", "Stopped", None, None)
    assert inst.config == {"environment.FOO": "bar"}
    assert inst.created_at.tzinfo is not None
    assert manager.exec_output_dir("c1") == data_dir / "instances" / "c1" / "exec-output"
    rootfs = data_dir / "instances" / "c1" / "rootfs"
    assert (rootfs / "etc" / "passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\n"
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    assert (rootfs / "usr" / "bin" / "env").resolve() == rootfs / "bin" / "busybox"
    with pytest.raises(Conflict, match='^Instance "c1" already exists$'):
        manager.create("c1")
    with pytest.raises(BadRequest, match="Unknown image"):
        manager.create("c2", image="ubuntu")
    with pytest.raises(BadRequest):
        manager.create("c3", config={"limits.cpu": 2})  # type: ignore[dict-item]
    assert [i.name for i in manager.list()] == ["c1"]


async def test_update_config_merges(manager: InstanceManager, data_dir: Path) -> None:
    manager.create("c1", config={"a": "1", "b": "2"})
    assert (await manager.update_config("c1", {"b": "3", "c": "4"})).config == {"a": "1", "b": "3", "c": "4"}
    fresh = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    assert fresh.get("c1").config == {"a": "1", "b": "3", "c": "4"}


def test_not_found(manager: InstanceManager) -> None:
    with pytest.raises(NotFound, match="^Instance not found$"):
        manager.get("nope")


# ---------------------------------------------------------------------------------------- lifecycle


async def test_lifecycle(manager: InstanceManager, data_dir: Path) -> None:
    manager.create("c1")
    inst = await manager.start("c1")
    assert inst.status == "Running" and inst.pid is not None and inst.last_used_at is not None
    assert pid_alive(inst.pid)
    assert [(i.name, i.status) for i in manager.list()] == [("c1", "Running")]
    state = json.loads((data_dir / "instances" / "c1" / "state.json").read_text())
    assert state["pid"] == inst.pid
    with pytest.raises(BadRequest, match="^The instance is already running$"):
        await manager.start("c1")
    with pytest.raises(BadRequest, match="^Instance is running$"):
        await manager.delete("c1")
    assert (await run(manager, "c1", ["echo", "hi"])) == (0, "hi\n", "")

    t0 = time.monotonic()
    stopped = await manager.stop("c1")
    assert time.monotonic() - t0 < 5  # nothing ignores SIGTERM: no grace period used up
    assert (stopped.status, stopped.pid) == ("Stopped", None)
    assert not pid_alive(inst.pid)
    assert not (data_dir / "instances" / "c1" / "state.json").exists()
    with pytest.raises(BadRequest, match="^The instance is already stopped$"):
        await manager.stop("c1")

    again = await manager.start("c1")  # restartable
    assert again.status == "Running" and again.pid != inst.pid
    await manager.stop("c1", force=True)
    await manager.delete("c1")
    assert manager.list() == []
    assert not (data_dir / "instances" / "c1").exists()
    freezer = Freezer.for_instance(CGROUP_PARENT, "c1")
    assert freezer is None or not freezer.path.exists()


async def test_pid1_is_detached_from_the_agent(manager: InstanceManager, c1: str) -> None:
    """Double fork + setsid: pid1's parent is init, its session and process group are its own."""
    pid = manager.get(c1).pid
    assert pid is not None
    with open(f"/proc/{pid}/stat") as f:
        ppid, pgrp, session = (int(x) for x in f.read().rsplit(")", 1)[1].split()[1:4])
    assert ppid == 1
    assert pgrp == session == pid
    assert os.getsid(0) != session


async def test_inside_view(manager: InstanceManager, c1: str) -> None:
    assert await run(manager, c1, ["hostname"]) == (0, f"{c1}\n", "")
    code, out, _ = await run(manager, c1, ["sh", "-c", "echo $$"])
    assert code == 0 and int(out) < 10  # a fresh pid namespace
    code, out, _ = await run(manager, c1, ["ps", "-o", "pid,comm"])
    rows = [line.split() for line in out.splitlines()[1:]]
    assert code == 0 and [pid for pid, _ in rows][0] == "1" and len(rows) == 2  # pid1 and ps itself
    script = ("cat /proc/1/cmdline | tr '\\0' ' ' | grep -q runtime/pid1 && echo proc-ok; "
              "echo x > /dev/null && head -c 4 /dev/zero | wc -c; "
              "test -c /dev/pts/ptmx && test -L /dev/ptmx && echo pts-ok; "
              "echo data > /tmp/f && cat /tmp/f; "
              "grep -E ' /(run|dev|dev/pts|proc|dev/shm) ' /proc/mounts | cut -d' ' -f2,3 | sort; "
              "ls /dev/fd/ >/dev/null && echo fd-ok")
    code, out, err = await run(manager, c1, ["sh", "-c", script])
    assert (code, err) == (0, "")
    assert out.split("\n") == ["proc-ok", "4", "pts-ok", "data", "/dev tmpfs", "/dev/pts devpts", "/dev/shm tmpfs",
                               "/proc proc", "/run tmpfs", "fd-ok", ""]
    assert await run(manager, c1, ["sh", "-c", "echo hi > /root/f && cat /root/f"]) == (0, "hi\n", "")


async def test_mounts_stay_inside(manager: InstanceManager, c1: str, data_dir: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        assert str(data_dir) not in f.read()


async def test_stop_kills_a_process_ignoring_sigterm_after_the_grace_period(manager: InstanceManager,
                                                                            c1: str) -> None:
    proc, pipes = await spawn_piped(manager, c1, ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
    try:
        assert os.read(pipes.stdout_r, 100) == b"ready\n"
        t0 = time.monotonic()
        inst = await manager.stop(c1, timeout=0.5)
        elapsed = time.monotonic() - t0
        assert inst.status == "Stopped"
        assert 0.5 <= elapsed < 5
        assert await asyncio.wait_for(proc.wait(), 5) == 137
        assert proc.host_pid is not None and not pid_alive(proc.host_pid)
    finally:
        proc.close()
        pipes.close()


async def test_graceful_stop_terminates_commands(manager: InstanceManager, c1: str) -> None:
    proc, pipes = await spawn_piped(manager, c1, ["sleep", "1000"])
    try:
        t0 = time.monotonic()
        await manager.stop(c1, timeout=30)
        assert time.monotonic() - t0 < 5
        assert await asyncio.wait_for(proc.wait(), 5) == 143  # SIGTERM, reported before pid1 exits
    finally:
        proc.close()
        pipes.close()


@pytest.fixture(params=["v1", "v2"])
def cgroup_version(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Freeze through the cgroup v1 freezer or the v2 ``cgroup.freeze`` (a hybrid host offers both)."""
    found = cgroups.detect()
    if request.param == "v1":
        if found is None or found[0] != "v1":
            pytest.skip("no cgroup v1 freezer on this machine")
        yield "v1"
        return
    root = next((Path(m[1]) for m in _mounts() if m[2] == "cgroup2"), None)
    if root is None or not (root / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 hierarchy on this machine")
    monkeypatch.setattr(cgroups, "detect", lambda: ("v2", root))
    yield "v2"
    try:
        (root / CGROUP_PARENT).rmdir()
    except OSError:
        pass


def _mounts() -> list[list[str]]:
    with open("/proc/self/mounts") as f:
        return [line.split() for line in f]


async def test_freeze_and_unfreeze(manager: InstanceManager, cgroup_version: str) -> None:
    c1 = unique_name()
    manager.create(c1)
    await manager.start(c1)
    freezer = Freezer.for_instance(CGROUP_PARENT, c1)
    assert freezer is not None and freezer.version == cgroup_version
    assert manager.get(c1).pid in freezer.pids()
    proc, pipes = await spawn_piped(manager, c1, ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; done"])
    counter = Path(f"/proc/{manager.get(c1).pid}/root/tmp/n")

    def count() -> int:
        try:
            return int(counter.read_text() or 0)
        except (OSError, ValueError):
            return 0
    try:
        await async_wait_for(lambda: count() > 10, 10, "the counter to run")
        inst = await manager.freeze(c1)
        assert inst.status == "Frozen"
        if freezer.version == "v1":
            assert (freezer.path / "freezer.state").read_text().strip() == "FROZEN"
        else:
            assert "frozen 1" in (freezer.path / "cgroup.events").read_text()
        frozen_at = count()
        await asyncio.sleep(0.3)
        assert count() == frozen_at  # no progress while frozen
        with pytest.raises(BadRequest, match="^Instance is frozen$"):
            await run(manager, c1, ["true"])
        with pytest.raises(BadRequest, match="already frozen"):
            await manager.freeze(c1)
        assert (await manager.unfreeze(c1)).status == "Running"
        await async_wait_for(lambda: count() > frozen_at + 10, 10, "the counter to run again")
        with pytest.raises(BadRequest, match="not frozen"):
            await manager.unfreeze(c1)

        await manager.freeze(c1)
        inst = await manager.stop(c1, timeout=5)  # a frozen instance stops too (thawed, then SIGTERM)
        assert inst.status == "Stopped"
        assert await asyncio.wait_for(proc.wait(), 5) == 143
    finally:
        proc.close()
        pipes.close()
        await cleanup_manager(manager)  # while the cgroup version is still patched in
    assert not freezer.path.exists()


async def test_readoption_by_a_new_manager(manager: InstanceManager, c1: str, data_dir: Path) -> None:
    pid = manager.get(c1).pid
    fresh = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    fresh.adopt()
    inst = fresh.get(c1)
    assert (inst.status, inst.pid) == ("Running", pid)
    assert await run(fresh, c1, ["hostname"]) == (0, f"{c1}\n", "")
    await fresh.stop(c1)
    assert manager.get(c1).status == "Stopped"  # the old manager notices too


async def test_stale_state_is_not_adopted(manager: InstanceManager, c1: str, data_dir: Path) -> None:
    """A state.json whose pid now belongs to another process (start time differs) means Stopped."""
    state_file = data_dir / "instances" / c1 / "state.json"
    state = json.loads(state_file.read_text())
    await manager.stop(c1, force=True)
    state_file.write_text(json.dumps(state | {"pid": os.getpid()}))
    fresh = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    assert fresh.get(c1).status == "Stopped"
    assert not state_file.exists()


async def test_instance_survives_its_launcher(data_dir: Path) -> None:
    """The agent process that started an instance dies (SIGKILL): the instance lives on."""
    name = unique_name()
    script = (f"import asyncio, sys; from pathlib import Path; from node_agent.runtime.instances import InstanceManager\n"
              f"m = InstanceManager(Path({str(data_dir)!r}), driver='oci', cgroup_parent={CGROUP_PARENT!r})\n"
              f"m.create({name!r}); print(asyncio.run(m.start({name!r})).pid, flush=True)\n"
              f"import time; time.sleep(1000)\n")
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
    finally:
        agent.kill()
        agent.wait()
    manager = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    try:
        assert pid_alive(pid) and manager.get(name).status == "Running"
        assert await run(manager, name, ["true"]) == (0, "", "")
    finally:
        await cleanup_manager(manager)


async def test_path_exists(manager: InstanceManager, c1: str) -> None:
    for running in (True, False):
        assert manager.get(c1).status == ("Running" if running else "Stopped")
        assert manager.path_exists(c1, "/etc/passwd")
        assert manager.path_exists(c1, "/bin/sh")
        assert not manager.path_exists(c1, "/snap")
        assert not manager.path_exists(c1, "/etc/NIXOS")
        if running:
            await manager.stop(c1, force=True)  # the same answers from the stopped rootfs


async def test_path_lookups_stay_inside_the_rootfs(manager: InstanceManager, c1: str, data_dir: Path) -> None:
    """A symlink planted inside (root in there owns its files) that names a host path resolves inside."""
    host_only = data_dir / "host-only"
    host_only.mkdir()
    (host_only / "marker").touch()
    (data_dir / "instances" / c1 / "rootfs" / "escape").symlink_to(host_only)
    (data_dir / "instances" / c1 / "rootfs" / "up").symlink_to("../../../../..")
    for running in (True, False):
        assert manager.path_exists(c1, "/escape/marker") is False
        assert manager.path_exists(c1, "/up/etc/passwd") is True  # '..' stops at the instance's root
        if running:
            await manager.stop(c1, force=True)


async def test_pty_comes_from_the_instance_devpts(manager: InstanceManager, c1: str) -> None:
    """pid1 opens the terminal in the container's own devpts: the host's /dev/pts never serves an instance."""
    proc = await manager.spawn(c1, SpawnRequest(["tty"], ENV, pty=True, width=80, height=24), ())
    try:
        assert proc.pty_master is not None
        assert os.fstat(proc.pty_master).st_dev != os.stat("/dev/pts/ptmx").st_dev
        assert await proc.wait() == 0
    finally:
        proc.close()
        if proc.pty_master is not None:
            os.close(proc.pty_master)


async def test_start_failure_is_reported(manager: InstanceManager, data_dir: Path) -> None:
    manager.create("broken")
    shutil.rmtree(data_dir / "instances" / "broken" / "rootfs")
    with pytest.raises(Exception, match="Failed to start instance: .*rootfs"):
        await manager.start("broken")
    assert manager.get("broken").status == "Stopped"


# ------------------------------------------------------------------------------ images and drivers


async def test_host_image(manager: InstanceManager) -> None:
    manager.create("h1", image="host")
    await manager.start("h1")
    code, out, _ = await run(manager, "h1", ["/usr/bin/env"], env={"A": "b"})
    assert (code, out) == (0, "A=b\n")
    assert await run(manager, "h1", ["hostname"]) == (0, "h1\n", "")
    code, _, err = await run(manager, "h1", ["touch", "/usr/x"])
    assert code != 0 and "Read-only file system" in err
    assert (await run(manager, "h1", ["python3", "-c", "print(1+1)"]))[1] == "2\n"
    assert manager.path_exists("h1", "/usr/bin/env")


async def test_process_driver() -> None:
    d = new_data_dir()
    with pytest.warns(RuntimeWarning, match="process"):
        manager = InstanceManager(d, driver="process", cgroup_parent=CGROUP_PARENT)
    assert manager.driver_name == "process"
    try:
        manager.create("p1")
        inst = await manager.start("p1")
        assert inst.status == "Running"
        assert await run(manager, "p1", ["sh", "-c", "echo $FOO; exit 3"], env=ENV | {"FOO": "x"}) == (3, "x\n", "")
        assert (await run(manager, "p1", ["no-such-command"]))[0] == 127
        assert await run(manager, "p1", ["pwd"], cwd="/tmp") == (0, "/tmp\n", "")
        proc, pipes = await spawn_piped(manager, "p1", ["sleep", "1000"])
        try:
            assert proc.host_pid == proc.pid
            await manager.stop("p1", timeout=5)
            assert await asyncio.wait_for(proc.wait(), 5) == 143
            assert not pid_alive(proc.pid)
        finally:
            proc.close()
            pipes.close()
    finally:
        await cleanup_manager(manager)
        shutil.rmtree(d, ignore_errors=True)


# -------------------------------------------------------------------------------------------- Ray


RAY_DRIVER = """
import json, os, sys
from pathlib import Path
import ray

data_dir, name, cgroup_parent, ray_tmp = sys.argv[1:5]
ray.init(address="local", include_dashboard=False, _temp_dir=ray_tmp, num_cpus=1, log_to_driver=False)


@ray.remote(num_cpus=0)
class Starter:
    async def start(self) -> tuple[int, int]:
        from node_agent.runtime.instances import InstanceManager
        m = InstanceManager(Path(data_dir), driver="oci", cgroup_parent=cgroup_parent)
        m.create(name)
        return (await m.start(name)).pid or 0, os.getpid()


actor = Starter.remote()
pid1, worker = ray.get(actor.start.remote(), timeout=120)
ray.kill(actor)  # the worker exits: Ray kills its children and (with pg cleanup) its process group
ray.shutdown()  # then the whole local cluster goes
print(json.dumps({"pid1": pid1, "worker": worker}), flush=True)
"""


def test_instance_survives_ray_shutdown() -> None:
    """Started from a Ray actor, an instance outlives the actor (killed) and the whole Ray cluster.

    Ray runs in a driver subprocess (so no Ray state stays in this process), with
    RAY_process_group_cleanup_enabled=true (Ray kills each worker's process group on exit) on top of the
    default RAY_kill_child_processes_on_worker_exit=true (Ray kills a worker's direct children).
    """
    pytest.importorskip("ray")
    ray_tmp = tempfile.mkdtemp(prefix="ebray", dir="/tmp")
    data = new_data_dir()
    name = unique_name("ray")
    env = os.environ | {"RAY_TMPDIR": ray_tmp, "RAY_process_group_cleanup_enabled": "true",
                        "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        done = subprocess.run([sys.executable, "-c", RAY_DRIVER, str(data), name, CGROUP_PARENT, ray_tmp], env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        pids = json.loads(done.stdout.strip().splitlines()[-1])
        wait_for(lambda: not pid_alive(pids["worker"]), 30, "the actor's worker to exit")
        wait_for(lambda: not processes_mentioning(ray_tmp), 60, "every Ray process to exit")
        assert pid_alive(pids["pid1"])
        manager = InstanceManager(data, driver="oci", cgroup_parent=CGROUP_PARENT)
        try:
            assert manager.get(name).status == "Running"
            assert asyncio.run(run(manager, name, ["hostname"])) == (0, f"{name}\n", "")
        finally:
            asyncio.run(cleanup_manager(manager))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


async def test_broken_definition_is_an_error_instance(manager: InstanceManager, data_dir: Path) -> None:
    manager.create("c1")
    (data_dir / "instances" / "c1" / "instance.json").write_text("{not json")
    fresh = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    assert fresh.get("c1").status == "Error"
    with pytest.raises(BadRequest, match="Cannot load instance"):
        await fresh.start("c1")
    await fresh.delete("c1")
    assert fresh.list() == []


SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs a Python that an unprivileged user may run")
def test_process_driver_without_root() -> None:
    """As an ordinary user (nobody) "auto" picks the process driver; uid 0 means that user."""
    work = Path(tempfile.mkdtemp(prefix="ebnobody", dir="/tmp"))
    os.chown(work, 65534, 65534)
    script = work / "run.py"
    script.write_text(
        "import asyncio, os, warnings\n"
        "from pathlib import Path\n"
        "from node_agent.runtime.instances import InstanceManager\n"
        "from node_agent.runtime.spawn import SpawnRequest\n"
        "async def main():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        f"        m = InstanceManager(Path({str(work / 'data')!r}))\n"
        "    print(m.driver_name, any('process' in str(w.message) for w in caught))\n"
        "    m.create('n1')\n"
        "    print((await m.start('n1')).status)\n"
        "    r, w = os.pipe()\n"
        "    p = await m.spawn('n1', SpawnRequest(['sh', '-c', 'id -u; exit 4'], {'PATH': '/usr/bin:/bin'}), (0, w, w))\n"
        "    os.close(w)\n"
        "    print(await p.wait(), os.read(r, 100).decode().strip())\n"
        "    p.close()\n"
        "    print((await m.stop('n1')).status)\n"
        "    await m.delete('n1')\n"
        "asyncio.run(main())\n")
    try:
        done = subprocess.run([str(SYSTEM_PYTHON), str(script)], user=65534, group=65534, extra_groups=[],
                              cwd=work, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        if "ModuleNotFoundError" in done.stderr:
            pytest.skip(f"{SYSTEM_PYTHON} cannot import the project: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n") == ["process True", "Running", "4 65534", "Stopped", ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_instances_from_before_containers_are_migrated(data_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """An instance the runtime before containers made (rootfs owned by host root, no id range), found
    running: restarted as an unprivileged container with a warning; a stopped one migrates on its start."""
    old = InstanceManager(data_dir, driver="process", cgroup_parent=CGROUP_PARENT)
    old.create("legacy")
    old.create("parked")
    await old.start("legacy")
    state = data_dir / "instances" / "legacy" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "driver"}))
    assert (data_dir / "instances" / "legacy" / "rootfs").stat().st_uid == 0
    manager = InstanceManager(data_dir, driver="oci", cgroup_parent=CGROUP_PARENT)
    try:
        manager.adopt()
        assert await manager.migrate_legacy() == ["legacy"]
        assert "restarting it as one" in caplog.text
        await manager.start("parked")
        for name in ("legacy", "parked"):
            base = manager.get(name).id_base
            assert base is not None and base >= 1_000_000
            assert (data_dir / "instances" / name / "rootfs" / "bin" / "busybox").stat().st_uid == base
            code, out, _ = await run(manager, name, ["sh", "-c", "id -u; cat /proc/self/uid_map"])
            assert code == 0 and out.split()[:3] == ["0", "0", str(base)]
    finally:
        await cleanup_manager(manager)
