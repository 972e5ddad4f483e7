"""Shared fixtures: one real broker (`execbroker up`: real Ray, uvicorn, instances) per test session."""

from __future__ import annotations

import grp
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from node_agent.runtime import cgroups
from node_agent.service import cgroup_parent

BIN = Path(sys.executable).parent


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment mentions ``text`` (zombies excluded).

    The environment matters: Ray rewrites its workers' titles (``ray::NodeAgent``), but they keep the
    EXECBROKER_DIR / RAY_TMPDIR of the test that started them."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (needle in cmd or needle in environ) and state != "Z":
            found.append((int(entry), cmd.replace(b"\0", b" ").decode(errors="replace")))
    return found


def read_pty(master: int, needle: bytes | None, timeout: float) -> bytes:
    """What a PTY master gives until ``needle`` shows (None: until EOF, the slave side all closed), or
    ``timeout`` seconds pass."""
    out = b""
    deadline = time.monotonic() + timeout
    while (needle is None or needle not in out) and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: no slave left
                break
            if not chunk:
                break
            out += chunk
    return out


def kill_all(procs: list[tuple[int, str]]) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


ADMIN_GID = grp.getgrnam("execbroker").gr_gid  # created by deploy/system-deps.sh


def members_online(ep: Endpoint, n: int) -> bool:
    """Whether ``ep`` lists ``n`` cluster members, all Online."""
    try:
        members = ep.api("GET", "/1.0/cluster/members?recursion=1")["metadata"]
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return len([m for m in members if m["status"] == "Online"]) == n


def private_base(prefix: str) -> Path:
    """A temporary base dir that only root may list; others may only pass through it
    (0711, as LXD's /var/lib/lxd: an instance's root, an unprivileged host uid, reaches its rootfs below).
    What lies inside is private by its own mode (the API socket: root and the execbroker group)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chown(base, 0, ADMIN_GID)
    base.chmod(0o711)
    return base


def assert_no_leftovers(base: Path, timeout: float) -> None:
    """The leak check of every fixture that starts brokers: nothing mentioning ``base`` survives its
    teardown. Leftovers fail the run, and are killed so that they do not spoil the next one."""
    try:
        wait_for(lambda: not processes_mentioning(str(base)), timeout, f"processes of {base} to exit")
    except AssertionError:
        leaked = processes_mentioning(str(base))
        kill_all(leaked)
        raise AssertionError(f"leaked processes: {leaked}") from None
    groups = [g for d in base.iterdir() if d.is_dir() for g in cgroups.remove_tree(cgroup_parent(d))]
    assert not groups, f"cgroups still holding processes: {groups}"


@dataclass
class Endpoint:
    """One node's API as a test sees it: its data dir (socket), the lxc client and raw HTTP on it."""

    base: Path
    data_dir: Path

    @property
    def socket(self) -> Path:
        return self.data_dir / "unix.socket"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LXD_DIR": str(self.data_dir), "EXECBROKER_DIR": str(self.data_dir),
                "HOME": str(self.base / "home")}

    def lxc(self, *args: str, input: bytes | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["lxc", *args], input=input, capture_output=True, env=self.env,
                              timeout=timeout, check=check)

    def http(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://eb",
                            timeout=30)

    def api(self, method: str, path: str, body: Any = None, status: int | None = None) -> dict[str, Any]:
        with self.http() as c:
            r = c.request(method, path, content=None if body is None else json.dumps(body))
        if status is not None:
            assert r.status_code == status, r.text
        return r.json()

    def wait_op(self, op_url: str, timeout: int = 30) -> dict[str, Any]:
        return self.api("GET", f"{op_url}/wait?timeout={timeout}")["metadata"]

    def launch(self, name: str, project: str = "default", target: str | None = None) -> None:
        """A running busybox instance, through the API (on member ``target`` if given)."""
        where = f"?project={project}" + (f"&target={target}" if target else "")
        op = self.api("POST", f"/1.0/instances{where}",
                      {"name": name, "source": {"type": "image", "alias": "busybox"}, "start": True}, status=202)
        done = self.wait_op(op["operation"], 60)
        assert done["status"] == "Success", done

    def remove(self, name: str, project: str = "default") -> None:
        """Stop (forced) and delete an instance, through the API."""
        op = self.api("PUT", f"/1.0/instances/{name}/state?project={project}", {"action": "stop", "force": True})
        if op.get("operation"):
            self.wait_op(op["operation"], 60)
        op = self.api("DELETE", f"/1.0/instances/{name}?project={project}")
        if op.get("operation"):
            self.wait_op(op["operation"], 60)


@dataclass
class Broker(Endpoint):
    proc: subprocess.Popen[str] = field(default=None)  # type: ignore[assignment]
    output: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # what this broker's `up` runs with beside ours


def start_broker(base: Path, **extra_env: str) -> Broker:
    (base / "home").mkdir(parents=True)
    broker = Broker(base=base, data_dir=base / "data", extra_env=extra_env)
    _launch(broker)
    return broker


def _launch(broker: Broker) -> None:
    """``execbroker up`` on the broker's data dir; returns once it serves."""
    env = {**os.environ, "EXECBROKER_DIR": str(broker.data_dir), "RAY_TMPDIR": str(broker.base / "ray"),
           "EXECBROKER_IMAGE_CACHE": str(broker.base / "images"),  # the debian image is built once per run
           "PYTHONUNBUFFERED": "1", **broker.extra_env}
    proc = subprocess.Popen([str(BIN / "execbroker"), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    broker.proc, broker.output = proc, []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            broker.output.append(line)
            if "serving on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(180) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("execbroker up did not start:\n" + "".join(broker.output))


def restart_broker(broker: Broker) -> None:
    """Stop the broker (its instances keep running, as LXD's outlive their daemon) and start it again."""
    _terminate(broker)
    _launch(broker)


def stop_broker(broker: Broker) -> None:
    try:
        for inst in broker.api("GET", "/1.0/instances?recursion=1")["metadata"]:
            broker.remove(inst["name"])
    finally:
        _terminate(broker)


def _terminate(broker: Broker) -> None:
    broker.proc.send_signal(signal.SIGTERM)
    try:
        broker.proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(broker.proc.pid, signal.SIGKILL)
        broker.proc.wait(10)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    base = private_base("eb-")
    b = start_broker(base)
    try:
        yield b
    finally:
        stop_broker(b)
        assert_no_leftovers(base, 30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def c1(broker: Broker) -> str:
    """The running busybox instance `up` created."""
    inst = broker.api("GET", "/1.0/instances/c1", status=200)["metadata"]
    assert inst["status"] == "Running"
    return "c1"


@pytest.fixture()
def exec_target(broker: Broker, c1: str) -> tuple[str, str]:
    """Where tests/test_client_cli.py runs: this broker's socket and instance."""
    return str(broker.socket), c1
