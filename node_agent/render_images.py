"""``/1.0/images`` and ``/1.0/images/aliases`` objects (Incus ``api.Image``, ``api.ImageAliasesEntry``)
for the images a node creates instances from."""

from __future__ import annotations

import platform
from typing import Any

from core.timefmt import rfc3339
from node_agent.runtime.images import Image


def image_url(img: Image) -> str:
    return f"/1.0/images/{img.fingerprint}"


def alias_url(img: Image) -> str:
    return f"/1.0/images/aliases/{img.alias}"


def render_image(img: Image) -> dict[str, Any]:
    return {
        "fingerprint": img.fingerprint,
        "filename": "",
        "size": img.size,
        "type": "container",
        "architecture": platform.machine(),
        "public": True,
        "cached": False,  # never fetched from another server: built here
        "auto_update": False,
        "update_source": None,
        "properties": {**img.properties, "description": img.description},
        "aliases": [{"name": img.alias, "description": img.description}],
        "profiles": ["default"],
        "created_at": rfc3339(img.created_at),
        "uploaded_at": rfc3339(img.created_at),
        "last_used_at": rfc3339(None),
        "expires_at": rfc3339(None),
    }


def render_alias(img: Image) -> dict[str, Any]:
    return {"name": img.alias, "description": img.description, "target": img.fingerprint, "type": "container"}
