"""What a node keeps of each instance: its definition (``instance.json``: image, config, its id range)
and the pid1 it runs (``state.json``), the name and config rules, and how both are read and written
(atomically)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from core.errors import BadRequest
from node_agent.runtime.launcher import Pid1Identity
from node_agent.runtime.limits import Limits

# oci: an unprivileged container under runc; process: no isolation (development without root);
# namespaces: the runtime before containers (instances still running it are adopted, and migrated to oci
# when they next start)
Driver = Literal["oci", "process", "namespaces"]
NAME_RE = re.compile(r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# An instance's key on a node: its name in the default project, ``<project>_<name>`` in another (as LXD
# names its storage; project names hold no ``_`` and never start with ``.``, instance names neither).
KEY_RE = re.compile(r"(?:[^/_ .][^/_ ]{0,62}_)?" + NAME_RE.pattern)
DEFAULT_PROJECT = "default"


def key(project: str, name: str) -> str:
    return name if project == DEFAULT_PROJECT else f"{project}_{name}"


def split_key(instance_key: str) -> tuple[str, str]:
    """(project, name) of a key."""
    project, sep, name = instance_key.rpartition("_")
    return (project, name) if sep else (DEFAULT_PROJECT, instance_key)


@dataclass
class Record:
    """What the manager keeps per instance: the persisted definition plus the running pid1, if any."""

    name: str
    image: str
    config: dict[str, str]
    created_at: datetime
    last_used_at: datetime | None = None
    pid1: Pid1Identity | None = None
    driver: Driver = "oci"  # of the running pid1 (a manager may adopt instances of another driver)
    id_base: int | None = None  # host uid (and gid) of root inside; None: never containerized yet
    broken: str | None = None  # why the definition could not be loaded (status Error)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


def validate_name(name: str) -> None:
    """Incus rules: 1-63 letters, digits and hyphens; no leading digit or hyphen, no trailing hyphen."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(f"Invalid instance name {name!r}: 1 to 63 letters, digits or hyphens, starting with "
                         "a letter and not ending with a hyphen")


def validate_config(config: dict[str, str]) -> dict[str, str]:
    if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in config.items()):
        raise BadRequest("Instance config must map strings to strings")
    Limits.from_config(config)  # limits.* must parse
    flag = config.get("security.no_new_privs", "false")
    if flag not in ("true", "false"):
        raise BadRequest(f'Invalid security.no_new_privs "{flag}": true or false')
    return dict(config)


def now() -> datetime:
    return datetime.now(timezone.utc)


def write_json(path: Path, data: object) -> None:
    write_private(path, json.dumps(data, indent=1))


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner (root) only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load(path: Path, name: str) -> Record:
    """The record in instance directory ``path``; a definition that cannot be read gives a broken one."""
    try:
        d = json.loads((path / "instance.json").read_text())
        rec = Record(name, d["image"], dict(d["config"]), datetime.fromisoformat(d["created_at"]),
                     datetime.fromisoformat(d["last_used_at"]) if d.get("last_used_at") else None,
                     id_base=int(d["id_base"]) if d.get("id_base") is not None else None)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Record(name, "", {}, now(), broken=f"Cannot load instance: {exc}")
    try:
        s = json.loads((path / "state.json").read_text())
        rec.pid1 = Pid1Identity(int(s["pid"]), int(s["start_time"]))
        rec.driver = s["driver"] if s.get("driver") in ("oci", "process") else "namespaces"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return rec


def save(path: Path, rec: Record) -> None:
    write_json(path / "instance.json", {
        "name": rec.name, "image": rec.image, "config": rec.config,
        "created_at": rec.created_at.isoformat(),
        "last_used_at": rec.last_used_at.isoformat() if rec.last_used_at else None,
        "id_base": rec.id_base,
    })


def save_state(path: Path, ident: Pid1Identity, driver: Driver) -> None:
    write_json(path / "state.json", asdict(ident) | {"driver": driver})
