"""Incus-shaped JSON for instances (spec §8 / pylxd's Instance attributes)."""

from __future__ import annotations

import platform
from typing import Any

from core import projects, timefmt
from node_agent.runtime.instances import Instance

STATUS_CODE = {"Running": 103, "Stopped": 102, "Frozen": 110, "Error": 112}
ARCH = platform.machine()


def instance_url(name: str, project: str = projects.DEFAULT) -> str:
    return f"/1.0/instances/{name}{projects.query_suffix(project)}"


def render_state(inst: Instance, usage: dict[str, int | None]) -> dict[str, Any]:
    """``/1.0/instances/{name}/state``: status, and what the instance uses (from its cgroups; -1 where the
    host does not account it)."""
    def figure(key: str) -> int:
        value = usage.get(key)
        return -1 if value is None else value

    return {
        "status": inst.status,
        "status_code": STATUS_CODE[inst.status],
        "disk": {},
        "memory": {"usage": figure("memory"), "usage_peak": figure("memory_peak"), "swap_usage": 0,
                   "swap_usage_peak": 0},
        "network": {},
        "pid": inst.pid or 0,
        "processes": figure("processes"),
        "cpu": {"usage": figure("cpu_ns")},
    }


def render_instance(inst: Instance, location: str, recursion: int = 1,
                    usage: dict[str, int | None] | None = None) -> dict[str, Any]:
    config = {"image.os": inst.image, **inst.config}
    body: dict[str, Any] = {
        "architecture": ARCH,
        "config": config,
        "created_at": timefmt.rfc3339(inst.created_at),
        "description": "",
        "devices": {},
        "ephemeral": False,
        "expanded_config": config,
        "expanded_devices": {},
        "name": inst.name,
        "profiles": ["default"],
        "project": inst.project,
        "stateful": False,
        "status": inst.status,
        "status_code": STATUS_CODE[inst.status],
        "last_used_at": timefmt.rfc3339(inst.last_used_at),
        "location": location,
        "type": "container",
    }
    if recursion >= 2:
        body["state"] = render_state(inst, usage or {})
        body["snapshots"] = []
        body["backups"] = []
    return body
