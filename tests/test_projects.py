"""Projects with the unmodified ``lxc`` client: names unique per project, operations and events of one
project invisible from another, and restricted certificates confined to their projects."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import unix_connect

from tests.conftest import Broker, wait_for
from tests.remotes import Remote, enable_https, issue_token
from tests.wsutil import Raw

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(shutil.which("lxc") is None, reason="lxd-client not installed (make test installs it)")]
PROJECT = "p1"


@pytest.fixture(scope="module")
def project(broker: Broker) -> Iterator[str]:
    """Project p1 holding its own ``c1`` (the default project has one too)."""
    r = broker.lxc("project", "create", PROJECT)
    assert r.returncode == 0, r.stderr
    broker.launch("c1", PROJECT)
    yield PROJECT
    broker.remove("c1", PROJECT)
    assert broker.lxc("project", "delete", PROJECT).returncode == 0


def test_project_list_and_names_per_project(broker: Broker, project: str, c1: str) -> None:
    names = broker.lxc("project", "list", "--format", "csv").stdout.decode()
    assert "default" in names and project in names
    assert broker.lxc("--project", project, "exec", "c1", "--", "touch", "/tmp/in-p1").returncode == 0
    assert broker.lxc("--project", project, "exec", "c1", "--", "test", "-e", "/tmp/in-p1").returncode == 0
    assert broker.lxc("exec", "c1", "--", "test", "-e", "/tmp/in-p1").returncode == 1  # another instance
    only_p1 = broker.lxc("--project", project, "list", "--format", "csv", "-c", "n").stdout.decode().split()
    assert only_p1 == ["c1"]
    every = broker.lxc("list", "--all-projects", "--format", "csv", "-c", "n").stdout.decode().split()
    assert every.count("c1") == 2


def test_project_switch(broker: Broker, project: str) -> None:
    assert broker.lxc("--project", project, "exec", "c1", "--", "touch", "/tmp/switched").returncode == 0
    r = broker.lxc("project", "switch", project)
    try:
        assert r.returncode == 0, r.stderr
        current = [row for row in broker.lxc("project", "list", "--format", "csv").stdout.decode().splitlines()
                   if "(current)" in row]
        assert len(current) == 1 and current[0].startswith(project)
        assert broker.lxc("exec", "c1", "--", "test", "-e", "/tmp/switched").returncode == 0  # p1's c1 now
    finally:
        broker.lxc("project", "switch", "default")
    assert broker.lxc("exec", "c1", "--", "test", "-e", "/tmp/switched").returncode == 1


def test_only_empty_projects_are_removed(broker: Broker, project: str) -> None:
    r = broker.lxc("project", "delete", project)
    assert r.returncode != 0 and b"Only empty projects can be removed" in r.stderr
    r = broker.lxc("project", "delete", "default")
    assert r.returncode != 0 and b"cannot be deleted" in r.stderr


@pytest.mark.parametrize("name, text", [("a_b", "underscores"), ("a b", "spaces"), ("a/b", "slashes")])
def test_bad_project_names(broker: Broker, name: str, text: str) -> None:
    r = broker.lxc("project", "create", name)
    assert r.returncode != 0 and text.encode() in r.stderr


async def test_operations_and_events_stay_in_their_project(broker: Broker, project: str) -> None:
    raw = Raw(broker.socket)
    seen = {"default": [], project: []}
    listeners = {p: await unix_connect(str(broker.socket), f"ws://eb/1.0/events?type=lifecycle&project={p}")
                 for p in seen}

    async def collect(p: str) -> None:
        async for frame in listeners[p]:
            seen[p].append(json.loads(frame))

    tasks = [asyncio.ensure_future(collect(p)) for p in seen]
    try:
        op = await raw.exec_op("c1", ["true"], project=project)  # stays Running: nothing connects
        try:
            async with raw.client() as c:
                default_ops = (await c.get("/1.0/operations?project=default&recursion=1")).json()["metadata"]
                p1_ops = (await c.get(f"/1.0/operations?project={project}&recursion=1")).json()["metadata"]
            ids = lambda ops: {o["id"] for group in ops.values() for o in group}  # noqa: E731
            assert op["id"] in ids(p1_ops) and op["id"] not in ids(default_ops)
        finally:
            async with raw.client() as c:
                await c.delete(f"/1.0/operations/{op['id']}")
        await asyncio.get_running_loop().run_in_executor(None, lambda: broker.lxc(
            "--project", project, "exec", "c1", "--", "true"))
        await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(
            lambda: any(e["metadata"]["action"] == "instance-exec" for e in seen[project]), 10, "p1's exec event"))
        assert all(e.get("project") == project for e in seen[project])
        assert not any(e["metadata"]["source"].endswith(f"?project={project}") for e in seen["default"])
    finally:
        for t in tasks:
            t.cancel()
        for ws in listeners.values():
            await ws.close()


@pytest.fixture(scope="module")
def confined(broker: Broker, project: str) -> Iterator[Remote]:
    """An HTTPS client restricted to p1."""
    https = enable_https(broker)
    client = Remote()
    r = client.add("eb", issue_token(broker, "confined", "--restricted", "--projects", project))
    assert r.returncode == 0, r.stderr
    yield client
    broker.lxc("config", "trust", "remove", client.fingerprint())
    client.remove()
    broker.lxc("config", "unset", "core.https_address")
    assert https


def test_restricted_certificate_sees_its_project_only(confined: Remote, project: str) -> None:
    projects = confined.lxc("project", "list", "eb:", "--format", "csv").stdout.decode()
    assert project in projects and "default" not in projects
    assert f"project: {project}" in (confined.home / "lxc" / "config.yml").read_text()  # remote add chose it
    r = confined.lxc("--project", project, "exec", "eb:c1", "--", "hostname")
    assert (r.returncode, r.stdout) == (0, b"c1\n"), r.stderr
    listed = confined.lxc("--project", project, "list", "eb:", "--format", "csv", "-c", "n")
    assert listed.stdout.decode().split() == ["c1"]
    r = confined.lxc("--project", "default", "exec", "eb:c1", "--", "true")
    assert r.returncode != 0 and b'User does not have permission for project "default"' in r.stderr
    r = confined.lxc("list", "eb:", "--all-projects")
    assert r.returncode != 0 and b"Certificate is restricted" in r.stderr


def test_restricted_certificate_changes_nothing_global(confined: Remote) -> None:
    for args, text in [(("project", "create", "eb:p2"), b"Certificate is restricted"),
                       (("config", "set", "eb:", "core.remote_token_expiry", "1H"), b"Certificate is restricted"),
                       (("query", "-X", "POST", "-d", '{"token": true, "name": "more"}', "eb:/1.0/certificates"),
                        b"Certificate is restricted")]:
        r = confined.lxc(*args)
        assert r.returncode != 0 and text in r.stderr, (args, r.stderr)
    raw = json.loads(confined.lxc("query", "eb:/1.0").stdout)
    assert raw["config"] == {}  # the server config is not shown to a restricted client


def test_restricted_certificate_cannot_find_other_projects_objects(confined: Remote, broker: Broker,
                                                                   project: str) -> None:
    """An instance of the default project, asked for under p1, does not exist (404), as in Incus."""
    broker.launch("d1")
    try:
        r = confined.lxc("query", f"eb:/1.0/instances/d1?project={project}")
        assert r.returncode != 0 and b"Instance not found" in r.stderr, r.stderr
        r = confined.lxc("--project", project, "exec", "eb:d1", "--", "true")
        assert r.returncode != 0 and b"Instance not found" in r.stderr, r.stderr
    finally:
        broker.remove("d1")


def test_restricted_certificate_files_stay_in_its_project(confined: Remote, project: str) -> None:
    """Files of its own project's instances work; the same name in another project is refused (403)."""
    r = confined.lxc("--project", project, "file", "pull", "eb:c1/etc/hostname", "-")
    assert (r.returncode, r.stdout) == (0, b"c1\n"), r.stderr
    r = confined.lxc("--project", "default", "file", "pull", "eb:c1/etc/hostname", "-")
    assert r.returncode != 0 and b'User does not have permission for project "default"' in r.stderr, r.stderr
    r = confined.lxc("query", "-X", "DELETE", "eb:/1.0/instances/c1/files?path=/etc/hostname&project=default")
    assert r.returncode != 0 and b'User does not have permission for project "default"' in r.stderr, r.stderr
    r = confined.lxc("query", "eb:/1.0/metrics")
    assert r.returncode == 0 and f'name="c1",project="{project}"'.encode() in r.stdout, r.stderr
    assert b'name="c1",project="default"' not in r.stdout  # only its projects' series
