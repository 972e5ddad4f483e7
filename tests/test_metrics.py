"""``/1.0/metrics`` read by the Prometheus text parser: the instances' series under LXD's names and the
broker's counters moving with the work done; ``lxc info`` with real figures."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Broker

pytestmark = pytest.mark.broker


def scrape(broker: Broker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with broker.http() as c:
        r = c.get("/1.0/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_instance_series_and_exec_counters(broker: Broker, c1: str) -> None:
    before = scrape(broker)
    r = broker.lxc("exec", c1, "--", "sh", "-c", "echo twelve-bytes; exit 3")
    assert r.returncode == 3 and r.stdout == b"twelve-bytes\n"
    assert broker.lxc("exec", c1, "--", "true").returncode == 0
    with broker.http() as c:
        assert c.post(f"/1.0/instances/{c1}/files", params={"path": "/tmp/m"}, content=b"x" * 1000).status_code == 200
    after = scrape(broker)
    inst = {"project": "default", "name": c1, "type": "container"}
    assert value(after, "lxd_procs_total", **inst) >= 1
    assert value(after, "lxd_memory_RSS_bytes", **inst) > 0 or value(after, "lxd_memory_Cached_bytes", **inst) > 0
    cpu = sum(v for (name, labels), v in after.items() if name == "lxd_cpu_seconds_total" and ("name", c1) in labels)
    assert cpu > 0
    grew = lambda metric, **labels: value(after, metric, **labels) - value(before, metric, **labels)  # noqa: E731
    assert grew("execbroker_execs_started_total", mode="websocket") == 2
    assert grew("execbroker_execs_finished_total", mode="websocket", result="success") == 2  # exit 3 is a success
    assert grew("execbroker_relayed_bytes_total", direction="out") >= len(b"twelve-bytes\n")
    assert grew("execbroker_exec_start_seconds_count") == 2
    assert grew("execbroker_file_bytes_total", direction="push") == 1000
    broker.lxc("exec", c1, "--", "rm", "/tmp/m")


def test_lxc_info_has_real_figures(broker: Broker, c1: str) -> None:
    broker.lxc("exec", c1, "--", "timeout", "1.5", "sh", "-c", "while :; do :; done")  # 1.5 s of CPU
    r = broker.lxc("info", c1)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "Status: RUNNING" in out and "PID: " in out
    assert "Memory (current): " in out and "Memory (current): 0" not in out
    cpu_line = next(line for line in out.splitlines() if "CPU usage (in seconds)" in line)
    assert int(cpu_line.split(":")[1]) >= 1, out


def test_worker_figures_add_to_the_agents() -> None:
    """A node's worker processes count their own execs; the agent's scrape adds theirs to its own, sample
    by sample (histogram buckets too), and never takes their instance series (the agent reads those)."""
    import json

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics

    from core.operations import OperationRegistry
    from node_agent.metrics import Metrics

    class NoInstances:
        def list(self) -> list[object]:
            return []

    agent, worker = (Metrics(NoInstances(), OperationRegistry("none", lambda _op: None)) for _ in range(2))  # type: ignore[arg-type]
    agent.execs_started.labels("task").inc(3)
    worker.execs_started.labels("task").inc(2)
    worker.execs_started.labels("websocket").inc()
    worker.exec_start_seconds.observe(0.003)
    agent.sessions.set_function(lambda: 4)
    worker.sessions.set_function(lambda: 1)
    shipped = json.loads(json.dumps(worker.samples()))  # as it crosses the link
    assert not [f for f in shipped if f[0].startswith("lxd_")]
    families = {f.name: f for f in openmetrics(agent.render(None, [shipped]).decode())}
    started = {s.labels["mode"]: s.value for s in families["execbroker_execs_started"].samples
               if s.name.endswith("_total")}
    assert started == {"task": 5.0, "websocket": 1.0}
    assert [s.value for s in families["execbroker_exec_sessions"].samples] == [5.0]
    buckets = {s.labels["le"]: s.value for s in families["execbroker_exec_start_seconds"].samples
               if s.name.endswith("_bucket")}
    assert (buckets["0.002"], buckets["0.005"], buckets["+Inf"]) == (0.0, 1.0, 1.0)
