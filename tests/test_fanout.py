"""Extension ``exec_fanout`` on one node: names or a config selector, the concurrency cap, failures
reported per instance, output bounded, the CLI's prefixed lines and summary."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import BIN, Broker

pytestmark = pytest.mark.broker
NAMES = [f"fan{i}" for i in range(6)]


@pytest.fixture(scope="module")
def fleet(broker: Broker) -> Iterator[list[str]]:
    for i, name in enumerate(NAMES):
        broker.launch(name)
        role = "web" if i % 2 == 0 else "db"
        op = broker.api("PATCH", f"/1.0/instances/{name}", {"config": {"user.role": role}})
        assert op.get("error_code", 0) == 0, op
    try:
        yield NAMES
    finally:
        for name in NAMES:
            broker.remove(name)


def fan(broker: Broker, body: dict[str, Any]) -> dict[str, Any]:
    op = broker.api("POST", "/1.0/exec", body, status=202)
    return broker.wait_op(op["operation"], 60)


def overlap(results: dict[str, dict[str, Any]]) -> int:
    """The most commands that ran at the same moment, from their start and end times."""
    edges = []
    for r in results.values():
        edges.append((datetime.fromisoformat(r["started_at"]), 1))
        edges.append((datetime.fromisoformat(r["ended_at"]), -1))
    running = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def test_named_instances_with_a_cap(broker: Broker, fleet: list[str]) -> None:
    final = fan(broker, {"command": ["sh", "-c", "sleep 0.3; hostname; exit ${#HOSTNAME}"],
                         "instances": fleet, "concurrency": 2})
    results = final["metadata"]["results"]
    assert final["status"] == "Success" and sorted(results) == fleet
    for name, r in results.items():
        assert (r["status"], r["return"], r["stdout"]) == ("Success", len(name), f"{name}\n"), r
    assert overlap(results) <= 2
    assert final["metadata"]["summary"] == {"total": 6, "done": 6, "failed": 0, "running": 0}


def test_selector_and_a_failing_instance(broker: Broker, fleet: list[str]) -> None:
    op = broker.api("PUT", "/1.0/instances/fan2/state", {"action": "stop", "force": True})
    broker.wait_op(op["operation"])
    try:
        final = fan(broker, {"command": ["true"], "selector": {"config": {"user.role": "web"}}})
        assert sorted(final["metadata"]["results"]) == ["fan0", "fan4"]  # fan2 is stopped: not selected
        final = fan(broker, {"command": ["sh", "-c", "yes | head -c 100000"], "instances": ["fan0", "fan2", "fan3"],
                             "output-limit": 1000})
        results = final["metadata"]["results"]
        assert results["fan2"]["status"] == "Failure" and results["fan2"]["error"] == "Instance is not running"
        for name in ("fan0", "fan3"):
            assert results[name]["status"] == "Success" and results[name]["truncated"]
            assert results[name]["stdout"] == "y\n" * 500
        assert final["metadata"]["summary"]["failed"] == 1
        audit = [r for r in broker.api("GET", "/1.0/audit?limit=20")["metadata"] if r["mode"] == "fanout"]
        last = {r["instance"]: r for r in audit}
        assert last["fan0"]["bytes_out"] == 100000 and last["fan0"]["return"] == 0  # all of it, not what was kept
    finally:
        op = broker.api("PUT", "/1.0/instances/fan2/state", {"action": "start"})
        broker.wait_op(op["operation"])


@pytest.mark.parametrize("body, text", [
    ({"command": ["true"]}, 'Give either "instances" or "selector"'),
    ({"command": ["true"], "instances": []}, '"instances" must name'),
    ({"command": ["true"], "instances": ["a", "a"]}, '"instances" must name'),
    ({"command": ["true"], "instances": ["fan0"], "concurrency": 0}, "concurrency"),
    ({"command": ["true"], "instances": ["fan0"], "concurrency": 1001}, "concurrency: must be from 1 to 1000"),
    ({"command": ["true"], "instances": ["fan0"], "output-limit": 2 << 20}, "must be from 0 to 1048576"),
    ({"command": ["true"], "instances": ["fan0"], "timeout": 0}, "timeout"),
    ({"command": [], "instances": ["fan0"]}, "Command is required"),
    ({"command": ["true"], "selector": {"config": {"user.role": "nobody"}}}, "No running instance"),
])
def test_bad_requests(broker: Broker, fleet: list[str], body: dict[str, Any], text: str) -> None:
    r = broker.api("POST", "/1.0/exec", body)
    assert r["error_code"] == 400 and text in r["error"], r


def test_timeout_applies_to_each(broker: Broker, fleet: list[str]) -> None:
    final = fan(broker, {"command": ["sleep", "50"], "instances": ["fan0", "fan1"], "timeout": 1})
    for r in final["metadata"]["results"].values():
        assert (r["status"], r["return"], r["error"]) == ("Failure", 124, "Command timed out after 1 s")


def test_cli_all_and_select(broker: Broker, fleet: list[str]) -> None:
    r = subprocess.run([str(BIN / "execbroker"), "exec", "--select", "user.role=db", "--concurrency", "5", "--",
                        "sh", "-c", "echo hi from $(hostname); exit 3"], env=broker.env, capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL, check=False)
    out = r.stdout.decode()
    assert r.returncode == 3, r
    for name in ("fan1", "fan3", "fan5"):
        assert f"{name} | hi from {name}\n" in out
    assert "fan0" not in out and "3 instances: 3 ran, 0 failed" in out
    r = subprocess.run([str(BIN / "execbroker"), "exec", "--all", "--", "true"], env=broker.env,
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0 and all(n in r.stdout.decode() for n in fleet), r


def test_full_output_to_exec_output_files(broker: Broker, fleet: list[str]) -> None:
    final = fan(broker, {"command": ["sh", "-c", "yes z | head -c 300000"], "instances": ["fan1"],
                         "output-limit": 10, "record-output": True})
    r = final["metadata"]["results"]["fan1"]
    assert r["stdout"] == "z\nz\nz\nz\nz\n" and r["truncated"]
    with broker.http() as c:
        whole = c.get(r["output"]["1"]).content
        for url in r["output"].values():
            c.delete(url)
    assert whole == b"z\n" * 150000
