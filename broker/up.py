"""``execbroker up``: start (or join) a Ray cluster, start this node's agent, serve until a signal."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

DEFAULT_DIR = "/var/lib/execbroker"


def data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("EXECBROKER_DIR") or DEFAULT_DIR).resolve()


def run(args: argparse.Namespace) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from node_agent.agent import NAMESPACE, NodeAgent, agent_name

    directory = data_dir(getattr(args, "dir", None))
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["EXECBROKER_DIR"] = str(directory)
    address = getattr(args, "address", None) or "local"
    server_name = getattr(args, "node_name", None) or socket.gethostname()
    started = time.monotonic()

    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    local = address == "local"
    # A local cluster talks over loopback only; a joining node uses the address Ray picks (or --node-ip).
    node_ip = getattr(args, "node_ip", None) or ("127.0.0.1" if local else None)
    ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True,
             logging_level="WARNING", configure_logging=True, _node_ip_address=node_ip)
    # After ray.init: Ray installs its own SIGTERM handler, which would end us without a clean stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = None
    try:
        node_id = ray.get_runtime_context().get_node_id()
        agent = NodeAgent.options(
            name=agent_name(node_id), namespace=NAMESPACE, max_concurrency=100_000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(str(directory), server_name, clustered=not local,
                 socket_mode=int(os.environ.get("EXECBROKER_SOCKET_MODE", "660"), 8))
        info = ray.get(agent.start.remote())
        default = os.environ.get("EXECBROKER_DEFAULT_INSTANCE", "c1")
        if default:
            ray.get(agent.ensure_instance.remote(default))
        print(f"execbroker: serving on {info['socket']} (node {server_name}, driver {info['driver']}, "
              f"ready in {time.monotonic() - started:.1f}s)", flush=True)
        stop.wait()
        print("execbroker: stopping", flush=True)
        return 0
    finally:
        if agent is not None:
            try:
                ray.get(agent.shutdown.remote(), timeout=15)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                print(f"execbroker: agent shutdown: {exc}", file=sys.stderr)
            ray.kill(agent)
        ray.shutdown()
