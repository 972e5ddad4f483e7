"""This node's Ray processes: ``ray start ... --block`` as a child in its own process group.

Stopping terminates exactly that child (which tears down the raylet and the rest it started), never
``ray stop``, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NAME_LABEL = "execbroker-name"
START_LABEL = "execbroker-start"  # one per `ray start`: a head restored from its GCS store still lists the
                                  # dead node of the same name as alive until its health checks fail

# Ray replaces exactly 127.0.0.1, ::1 and "localhost" given as a node address by the machine's interface
# address (ray._private.services.resolve_ip_for_localhost), so members on one machine would dial each other
# there. Any other address of 127/8 is kept as given, and on Linux the whole of 127/8 is loopback.
LOOPBACK_NODE_IP = "127.0.0.2"
STARTED_LINE = b"Ray runtime started."  # what `ray start` prints once its node is registered

# How fast the GCS declares a node dead (Ray's defaults take ~12-14 s): a probe every second, 1 s to answer,
# dead after 3 misses, so a lost member is surfaced in ~3-4 s. Each is Ray's own knob: a value set in the
# environment of `execbroker up` wins.
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
    # how long members (raylets and workers) wait for a lost head's GCS to return before they give up
    # (Ray's default is 60 s): with a GCS store the head can be restarted within it
    "RAY_gcs_rpc_server_reconnect_timeout_s": "300",
}


# The agent's event loop is asyncio's own, even where uvloop is installed (Ray would take it): measured on
# the exec path (2 cores, same run), uvloop cost more agent CPU per exec (10.4-12.7 ms against 7.3-10) and
# its TLS client broke the member link against the pyOpenSSL listener (ConnectionResetError).
EVENT_LOOP = {"RAY_USE_UVLOOP": "0"}


def advertised_ip(ip: str) -> str:
    """The node address to give Ray for ``ip``: for the loopback addresses Ray would replace, one it keeps."""
    return LOOPBACK_NODE_IP if ip.strip("[]") in ("127.0.0.1", "::1", "localhost") else ip


def route_ip(host: str = "8.8.8.8", port: int = 53) -> str:
    """The local address that reaches ``host`` (no packet is sent); the default asks for the address
    other machines reach this one at, as Ray's own pick does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host.strip("[]"), port))
        except OSError:  # no route: a machine without a network
            return LOOPBACK_NODE_IP
        return str(s.getsockname()[0])


def free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def ray_binary() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` command is not installed next to this Python")
    return found


class RayNode:
    def __init__(self, *, head: bool, node_ip: str, name: str, address: str | None = None,
                 port: int | None = None, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.head = head
        self.node_ip = node_ip
        self.name = name
        self.port = port or (free_port(node_ip) if head else None)
        self.address = f"{node_ip}:{self.port}" if head else address
        # Ray 2.60's `ray start --block` drains its node for up to 30 s on SIGTERM; our agents keep it
        # busy, so a stop would always wait that long (measured: 30.5 s vs 1.9 s without the drain).
        self.env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **EVENT_LOOP, **HEALTH_CHECKS, **os.environ,
                    **(env or {}), "PYTHONUNBUFFERED": "1"}  # its "started" line reaches the log at once
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_id = os.urandom(6).hex()
        self._log_from = 0  # where this start's output begins in the log

    def command(self) -> list[str]:
        cmd = [ray_binary(), "start", "--block", f"--node-ip-address={self.node_ip}", "--disable-usage-stats",
               f"--labels={NAME_LABEL}={self.name},{START_LABEL}={self.start_id}"]
        if self.head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        return cmd

    def start(self) -> None:
        self._log_from = self.log.stat().st_size if self.log is not None and self.log.exists() else 0
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - kept by the child
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_started(self, timeout: float = 30.0) -> bool:
        """Wait until ``ray start`` says its node runs (it says so once its raylet is registered with the
        GCS): a driver connecting before that finds no node and sleeps a whole second between looks
        (Ray 2.60, ``services.get_node_to_connect_for_driver``), ~1-2 s of every start. False when the
        log is not ours to read or the line did not come in time (the driver then waits its own way)."""
        if self.log is None:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"`ray start` exited; see {self.log}")
            try:
                with open(self.log, "rb") as f:
                    f.seek(self._log_from)
                    if STARTED_LINE in f.read():
                        return True
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # Whatever of its process group outlived it (Ray's dashboard and runtime-env agents can): ours.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


    def node_id(self, timeout: float = 60.0) -> str:
        """This node's Ray node id, by the labels of this very start (connect with ray.init first)."""
        import ray

        want = {NAME_LABEL: self.name, START_LABEL: self.start_id}
        deadline = time.monotonic() + timeout
        while True:
            for node in ray.nodes():
                labels = node.get("Labels") or {}
                if node.get("Alive") and all(labels.get(k) == v for k, v in want.items()):
                    return str(node["NodeID"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"no alive Ray node labelled {want}")
            time.sleep(0.1)
