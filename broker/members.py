"""Incus-shaped JSON for cluster members and for the instances of a member that is offline."""

from __future__ import annotations

import platform
from typing import Any

from broker.cluster_link import MemberInfo
from node_agent.render import STATUS_CODE


def member_json(info: MemberInfo) -> dict[str, Any]:
    return {
        "server_name": info.name, "url": f"https://{info.address}", "database": False,
        "status": "Online" if info.alive else "Offline",
        "message": "Fully operational" if info.alive else "Ray reports the node as dead",
        "architecture": platform.machine(), "failure_domain": "default", "description": "",
        "config": {}, "groups": ["default"], "roles": [],
    }


def offline_instance(name: str, project: str, member: str) -> dict[str, Any]:
    """An instance whose member is lost: listed with status Error, never missing."""
    return {
        "name": name, "status": "Error", "status_code": STATUS_CODE["Error"], "location": member,
        "type": "container", "architecture": platform.machine(), "config": {}, "expanded_config": {},
        "devices": {}, "expanded_devices": {}, "profiles": [], "ephemeral": False, "stateful": False,
        "project": project, "description": f"Cluster member {member} is offline",
        "created_at": "0001-01-01T00:00:00Z", "last_used_at": "0001-01-01T00:00:00Z",
    }
