"""The server object of ``GET /1.0`` (spec §7): API extensions, auth, environment."""

from __future__ import annotations

import os
import platform
from typing import Any

from core.identity import Identity

API_EXTENSIONS = [
    "container_exec_recording", "container_exec_signal_handling", "container_exec_user_group_cwd",
    "instances", "projects", "operation_description", "event_lifecycle", "event_location",
    "event_project", "operations_get_query_all_projects", "operation_wait", "api_filtering", "clustering",
    "container_full", "instance_get_full", "certificate_update", "certificate_token", "certificate_project",
    "certificate_self_renewal", "remote_token_expiry", "projects_restrictions", "instance_all_projects",
    "file_delete", "file_append", "directory_manipulation", "file_symlinks",
    # execbroker's own (docs/architecture.md, "Beyond LXD"):
    "exec_timeout", "exec_audit", "exec_recording", "exec_detach", "exec_fanout",
]
VERSION = "0.1.0"


def render_untrusted() -> dict[str, Any]:
    """``GET /1.0`` for a client whose certificate is not trusted (what Incus shows it)."""
    return {"api_extensions": API_EXTENSIONS, "api_status": "stable", "api_version": "1.0", "auth": "untrusted",
            "public": False, "auth_methods": ["tls"]}


def render_server(who: Identity, server_name: str, clustered: bool, driver: str,
                  config: dict[str, str] | None = None, addresses: list[str] | None = None,
                  certificate: str = "", fingerprint: str = "", project: str = "default") -> dict[str, Any]:
    """``GET /1.0``: the server's description as the lxc client and pylxd read it (a restricted
    client sees no config)."""
    uname = os.uname()
    return {
        "config": {} if who.restricted else dict(config or {}),
        "api_extensions": API_EXTENSIONS,
        "api_status": "stable",
        "api_version": "1.0",
        "auth": "trusted",
        "public": False,
        "auth_methods": ["tls"],
        "auth_user_name": who.username,
        "auth_user_method": who.protocol,
        "environment": {
            "addresses": list(addresses or []),
            "architectures": [platform.machine()],
            "certificate": certificate,
            "certificate_fingerprint": fingerprint,
            "driver": "execbroker",
            "driver_version": driver,
            "firewall": "",
            "kernel": uname.sysname,
            "kernel_architecture": uname.machine,
            "kernel_features": {},
            "kernel_version": uname.release,
            "lxc_features": {},
            "os_name": "execbroker",
            "os_version": VERSION,
            "project": project,
            "server": "execbroker",
            "server_clustered": clustered,
            "server_event_mode": "full-mesh",
            "server_name": server_name,
            "server_pid": os.getpid(),
            "server_version": VERSION,
            "storage": "dir",
            "storage_version": "1",
            "storage_supported_drivers": [],
        },
    }
