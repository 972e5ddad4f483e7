"""Images through the unmodified ``lxc``: ``lxc image list``/``info``, ``lxc launch busybox`` and
``lxc launch debian`` (built with mmdebstrap from this machine's Debian mirror on first use, with progress)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from node_agent.runtime import debian
from tests.conftest import Broker

pytestmark = pytest.mark.broker


def test_image_list_and_info(broker: Broker) -> None:
    r = broker.lxc("image", "list", "--format", "csv", "-c", "lfd")
    assert r.returncode == 0, r.stderr
    rows = {line.split(",")[0]: line.split(",") for line in r.stdout.decode().splitlines()}
    assert set(rows) == {"busybox", "debian", "host"}
    fingerprint = broker.api("GET", "/1.0/images/aliases/busybox")["metadata"]["target"]
    assert fingerprint.startswith(rows["busybox"][1]) and len(fingerprint) == 64
    info = broker.lxc("image", "info", "busybox")
    assert info.returncode == 0 and f"Fingerprint: {fingerprint}".encode() in info.stdout, info
    assert broker.api("GET", f"/1.0/images/{fingerprint[:12]}")["metadata"]["fingerprint"] == fingerprint


def test_launch_busybox(broker: Broker) -> None:
    try:
        r = broker.lxc("launch", "busybox", "img-bb")
        assert r.returncode == 0, r.stderr
        r = broker.lxc("exec", "img-bb", "--", "sh", "-c", "hostname; cat /proc/self/uid_map")
        lines = r.stdout.decode().split("\n")
        assert lines[0] == "img-bb" and lines[1].split()[0:1] == ["0"] and int(lines[1].split()[1]) >= 1_000_000
    finally:
        broker.lxc("delete", "--force", "img-bb")


def _mirror_unreachable() -> str | None:
    uri = debian.mirrors(debian.host_sources())[0].rstrip("/")
    try:
        with urllib.request.urlopen(f"{uri}/dists/{debian.SUITE}/Release", timeout=10) as r:
            r.read(1)
    except (urllib.error.URLError, OSError) as exc:
        return f"the Debian mirror {uri} is unreachable from here ({exc}): lxc launch debian not tested"
    return None


def test_launch_debian(broker: Broker) -> None:
    """The first launch builds the image (progress shown as lxc shows an image download), the second copies it."""
    reason = _mirror_unreachable()
    if reason:
        pytest.skip(reason)
    try:
        r = broker.lxc("launch", "debian", "img-deb1", timeout=900)
        assert r.returncode == 0, r.stderr
        assert b"Retrieving image: mmdebstrap:" in r.stdout  # the build's stages, as they happened
        r = broker.lxc("exec", "img-deb1", "--", "sh", "-c",
                       "grep VERSION_ID /etc/os-release; python3 -c 'print(6*7)'; apt-get --version | head -1; id -u")
        out = r.stdout.decode().split("\n")
        assert out[0] == 'VERSION_ID="12"' and out[1] == "42" and out[2].startswith("apt "), r
        assert out[3] == "0"
        assert broker.lxc("launch", "debian", "img-deb2").returncode == 0  # from the cache: no build
        image = broker.api("GET", "/1.0/images/aliases/debian")["metadata"]["target"]
        assert broker.api("GET", f"/1.0/images/{image}")["metadata"]["size"] > 50 << 20
        # set-id bits survive the ownership shift, and su works (no_new_privs is off, as in LXD)
        r = broker.lxc("exec", "img-deb2", "--", "sh", "-c", "stat -c %A /usr/bin/passwd; su -s /bin/sh nobody -c 'id -u'")
        assert r.stdout.decode().split() == ["-rwsr-xr-x", "65534"], r
    finally:
        broker.lxc("delete", "--force", "img-deb1")
        broker.lxc("delete", "--force", "img-deb2")
