"""``execbroker up``: start this node's Ray processes (a new cluster, or joining one with ``--address``),
make sure the cluster's controller runs (it keeps one NodeAgent per node), wait for this node's agent to
serve, create ``c1`` when the cluster has no instance, then serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from broker.gcs_store import ExternalRedis, LocalRedis
from core.workers import MAX_WORKERS
from broker.raynode import HEALTH_CHECKS, LOOPBACK_NODE_IP, advertised_ip, route_ip

if TYPE_CHECKING:
    from broker.raynode import RayNode

DEFAULT_DIR = "/var/lib/execbroker"
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("EXECBROKER_DIR") or DEFAULT_DIR).resolve()


def run(args: argparse.Namespace) -> int:
    directory = data_dir(getattr(args, "dir", None))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o711)  # as LXD's /var/lib/lxd: others pass (instances' roots), nobody lists
    address = getattr(args, "address", None)
    name = getattr(args, "node_name", None) or os.environ.get("EXECBROKER_NODE_NAME") or socket.gethostname()
    if not NAME_RE.match(name):
        print(f"execbroker: invalid node name {name!r}", file=sys.stderr)
        return 2
    clustered = bool(address) or bool(getattr(args, "cluster", False))
    asked = getattr(args, "workers", None)
    from_env = os.environ.get("EXECBROKER_WORKERS") or "1"
    processes = asked if asked is not None else (int(from_env) if from_env.isdigit() else 0)
    if not 1 <= processes <= MAX_WORKERS:
        print(f"execbroker: --workers must be 1..{MAX_WORKERS}", file=sys.stderr)
        return 2
    node_ip = advertised_ip(_node_ip(getattr(args, "node_ip", None), address, clustered))
    env = {
        "EXECBROKER_DIR": str(directory),
        "EXECBROKER_NODE_NAME": name,
        "EXECBROKER_CLUSTERED": "1" if clustered else "",
        "EXECBROKER_HTTPS": getattr(args, "https", None) or os.environ.get("EXECBROKER_HTTPS", ""),
        "EXECBROKER_WORKERS": str(processes),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
    }
    os.environ.update(env)
    for knob, value in HEALTH_CHECKS.items():  # this driver's own core worker waits for a lost GCS too
        os.environ.setdefault(knob, value)
    _ensure_auth_token(head=not address)
    # Ray reads RAY_AUTH_MODE when it is imported: import it only now.
    import ray

    from broker.cluster_link import NAMESPACE
    from broker.raynode import RayNode

    started = time.monotonic()
    store = _gcs_store(getattr(args, "redis", None), directory, head=not address)
    if store is not None:
        env.update(store.ray_env())
    node = RayNode(head=not address, node_ip=node_ip, name=name, address=address,
                   port=_gcs_port(args, directory, keep=store is not None), env=env, log=directory / "ray.log")

    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    agent = None
    try:
        if store is not None:
            _forget_stale_head(node.address)
            store.start()
        steps = Steps()
        node.start()
        address_up = _wait_for_gcs(node)
        node.wait_started()
        steps.done("ray start")
        ray.init(address=address_up, namespace=NAMESPACE, log_to_driver=False,
                 logging_level="WARNING", _node_ip_address=node_ip)
        steps.done("driver")
        # After ray.init: Ray installs its own SIGTERM handler, which would end us without a clean stop.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        from broker.controller import agent_for, ensure_controller
        from node_agent.agent import get_state_actor

        # Every actor at once, each in a worker of its own that Ray starts in parallel: the controller
        # (it would create this node's agent only after its own worker is up), the directory, the cluster
        # state and this node's agent (get_if_exists: whoever comes first creates it).
        ensure_controller()
        get_state_actor()
        node_id = node.node_id()
        steps.done("controller")
        agent = agent_for(node_id)
        info = ray.get(agent.start.remote())
        steps.done("agent")
        _wait_until_listed(name, node_id)
        steps.done("listed")
        default = os.environ.get("EXECBROKER_DEFAULT_INSTANCE", "c1")
        if default and not address:
            ray.get(agent.ensure_instance.remote(default))
            steps.done("instance")
        https = f", https {info['https']}" if info.get("https") else ""
        print(f"execbroker: serving on {info['socket']}{https} (member {name}, node {node_ip}, "
              f"driver {info['driver']}, ready in {time.monotonic() - started:.1f}s: {steps})", flush=True)
        if not address:
            print(f"execbroker: other nodes join with: execbroker up --address {node.address}", flush=True)
        while not stop.wait(1.0):
            if not node.alive():
                print("execbroker: the Ray node exited", file=sys.stderr, flush=True)
                return 1
        print("execbroker: stopping", flush=True)
        return 0
    finally:
        if agent is not None:
            try:
                ray.get(agent.shutdown.remote(), timeout=15)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                print(f"execbroker: agent shutdown: {exc}", file=sys.stderr)
        # Ray's driver may end this process in ray.shutdown() (a raylet it lost): our children stop first.
        try:
            node.stop()
        finally:
            if store is not None:
                store.stop()
            if ray.is_initialized():
                ray.shutdown()


def _ensure_auth_token(head: bool) -> None:
    """Ray token auth for every process of ours (DESIGN §1b): the mode explicit, and a token to share.

    The head creates ``~/.ray/auth_token`` when no token exists; other hosts need the same token (copy
    the file or set RAY_AUTH_TOKEN). ``RAY_AUTH_MODE=disabled`` set by the user is respected."""
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token" or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if head and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))


def _gcs_store(redis: str | None, directory: Path, head: bool) -> LocalRedis | ExternalRedis | None:
    """Where the GCS keeps the cluster's state: a Redis of our own (``local``), one named, or none."""
    if not redis:
        return None
    if not head:
        raise SystemExit("execbroker: --redis is for the head (members reach the GCS through it)")
    return LocalRedis(directory) if redis == "local" else ExternalRedis(redis)


def _forget_stale_head(address: str | None) -> None:
    """A head restarting on its GCS store: Ray's pointer to "the cluster last started here" names this
    very address, and on one machine the members' raylets (waiting for the GCS to return) name it too, so
    `ray start --head` would take the dead head for a running one and refuse."""
    pointer = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    try:
        if pointer.read_text().strip() == address:
            pointer.unlink()
    except OSError:
        pass


def _gcs_port(args: argparse.Namespace, directory: Path, keep: bool) -> int | None:
    """The head's GCS port; with a GCS store it is kept in the data dir, so a restarted head is found
    where its members (which wait for it) look."""
    port: int | None = getattr(args, "port", None)
    saved = directory / "gcs-port"
    if keep:
        if port is None and saved.exists():
            port = int(saved.read_text())
        if port is None:
            from broker.raynode import free_port

            port = free_port("127.0.0.1")
        saved.write_text(str(port))
    return port


def _node_ip(given: str | None, address: str | None, clustered: bool) -> str:
    """What this node tells the others to dial: the address given; for a joining node the one that
    reaches the head (loopback for a head on this machine); a single node keeps to loopback; the head of
    a cluster to be joined from other machines offers its outward address."""
    if given:
        return given
    if address:
        host, _, port = address.rpartition(":")
        ip = route_ip(host, int(port or 6379))
        if ip == LOOPBACK_NODE_IP and not host.strip("[]").startswith("127."):  # no route to the head
            raise SystemExit(f"execbroker: no route to the head {address}: give --node-ip, or check the address")
        return ip
    if not clustered:
        return "127.0.0.1"
    outward = route_ip()
    if outward.startswith("127."):
        raise SystemExit("execbroker: no route off this machine to pick an address others can dial: "
                         "give --node-ip")
    return outward


class Steps:
    """How long each step of the start took, for the ready line."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._steps: list[tuple[str, float]] = []

    def done(self, step: str) -> None:
        now = time.monotonic()
        self._steps.append((step, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {seconds:.2f}s" for step, seconds in self._steps)


def _wait_for_gcs(node: RayNode, timeout: float = 120.0) -> str:
    """The head's GCS address once this node's ``ray start`` is up."""
    assert node.address
    host, _, port = node.address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        if not node.alive():
            raise RuntimeError(f"`ray start` exited; see {node.log}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray head {node.address} did not come up") from None
            time.sleep(0.1)
    return node.address


def _wait_until_listed(name: str, node_id: str, timeout: float = 60.0) -> None:
    """Until every other member's agent lists this member as online: `up` reports a member ready only
    once any member can route to it (``lxc cluster list`` anywhere shows it)."""
    import ray

    from broker.cluster_link import agent_name

    deadline = time.monotonic() + timeout
    while True:
        peers = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != node_id]
        waiting = []
        for peer in peers:
            try:
                listed = ray.get(_wait_for_agent(agent_name(peer), timeout=0).lists_member.remote(name, node_id),
                                 timeout=10)
            except (RuntimeError, ray.exceptions.RayError):
                continue  # an agent that is not there (yet) lists us when it starts
            if not listed:
                waiting.append(peer)
        if not waiting:
            return
        if time.monotonic() > deadline:  # serve anyway: those members list it once they refresh
            print(f"execbroker: members on nodes {waiting} do not list {name} after {timeout}s", file=sys.stderr)
            return
        time.sleep(0.1)


def _wait_for_agent(name: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    import ray

    from broker.cluster_link import NAMESPACE

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agent {name} after {timeout}s") from None
            time.sleep(0.1)
