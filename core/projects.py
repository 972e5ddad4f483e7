"""Projects (Incus ``/1.0/projects``): name rules, the project object, configuration keys, and the
``default`` project that always exists. IO-free; projects live in the replicated map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import BadRequest

DEFAULT = "default"
MAX_NAME = 63
MAX_DESCRIPTION = 4096
FEATURES = ("features.images", "features.profiles", "features.storage.volumes", "features.storage.buckets",
            "features.networks", "features.networks.zones")
# What a new project gets when the request does not say (as Incus does).
NEW_PROJECT_CONFIG = {"features.images": "true", "features.profiles": "true", "features.storage.volumes": "true"}


def validate_name(name: Any) -> str:
    """Incus rules: not empty, no slashes, spaces or underscores (``_`` separates project and instance
    names on disk), not starting with ``.``, at most 63 characters."""
    if not isinstance(name, str) or not name:
        raise BadRequest("Missing project name")
    if "/" in name:
        raise BadRequest("Project names may not contain slashes")
    if " " in name:
        raise BadRequest("Project names may not contain spaces")
    if "_" in name:
        raise BadRequest("Project names may not contain underscores")
    if name.startswith(".") or len(name) > MAX_NAME or not name.isprintable():
        raise BadRequest(f"Invalid project name {name!r}")
    return name


def validate_config(config: Any) -> dict[str, str]:
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
        raise BadRequest("Project config must map strings to strings")
    for key, value in config.items():
        if key in FEATURES:
            if value not in ("true", "false"):
                raise BadRequest(f'Invalid value for "{key}": must be true or false')
        elif not key.startswith("user."):
            raise BadRequest(f'Invalid project configuration key "{key}"')
    return dict(config)


def validate_description(description: Any) -> str:
    if description is None:
        return ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise BadRequest(f"Project description must be a string of at most {MAX_DESCRIPTION} characters")
    return description


@dataclass(frozen=True)
class Project:
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)

    def to_value(self) -> dict[str, Any]:
        return {"description": self.description, "config": self.config}

    @classmethod
    def from_value(cls, name: str, v: dict[str, Any]) -> Project:
        return cls(name, str(v.get("description", "")), dict(v.get("config") or {}))

    def to_api(self, used_by: list[str]) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "config": self.config, "used_by": used_by}


DEFAULT_PROJECT = Project(DEFAULT, "Default project", dict(NEW_PROJECT_CONFIG, **{"features.networks": "true"}))


def query_suffix(project: str) -> str:
    """What resource URLs of a project carry (``?project=p1``; nothing for ``default``)."""
    return "" if project == DEFAULT else f"?project={project}"
