"""``GET /1.0/metrics`` of one member, in OpenMetrics text (prometheus-client, one registry per agent):

* the instances' figures under LXD's names (``lxd_cpu_seconds_total``, ``lxd_memory_<kind>_bytes``,
  ``lxd_memory_OOM_kills_total``, ``lxd_procs_total``; labels ``project``, ``name``, ``type``), read
  from their cgroups at scrape time;
* the broker's own: execs started and finished (by mode and result), the time from an exec request to
  its command running, live exec sessions, bytes relayed, requests relayed to other members, file
  bytes moved, operations by class and status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest

from core.operations import OperationRegistry
from node_agent.runtime import records
from node_agent.runtime.instances import InstanceManager

disable_created_metrics()  # no *_created series: a scrape is the figures, not when a counter was made
CONTENT_TYPE = CONTENT_TYPE_LATEST
LABELS = ("project", "name", "type")
INSTANCE_PREFIX = "lxd_"  # the instances' families (read from their cgroups by the agent only)
START_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    def __init__(self, instances: InstanceManager, ops: OperationRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.execs_started = Counter("execbroker_execs_started", "Execs started, by mode (interactive, "
                                     "websocket, task)", ["mode"], registry=r)
        self.execs_finished = Counter("execbroker_execs_finished", "Execs finished, by mode and result "
                                      "(success, failure, cancelled)", ["mode", "result"], registry=r)
        self.exec_start_seconds = Histogram("execbroker_exec_start_seconds", "From an exec's command being "
                                            "asked of the instance to it running", buckets=START_BUCKETS,
                                            registry=r)
        self.sessions = Gauge("execbroker_exec_sessions", "Exec sessions alive on this member", registry=r)
        self.relayed_bytes = Counter("execbroker_relayed_bytes", "Bytes relayed between exec websockets and "
                                     "commands, by direction (in: to the command)", ["direction"], registry=r)
        self.forwarded = Counter("execbroker_forwarded_requests", "Requests this member relayed to the "
                                 "member owning what they name, by kind (call, websocket, file)", ["kind"],
                                 registry=r)
        self.file_bytes = Counter("execbroker_file_bytes", "Bytes of instance files moved, by direction "
                                  "(push, pull)", ["direction"], registry=r)
        self.link_dials = Counter("execbroker_member_link_dials", "Member links this member dialled (one "
                                  "persistent link per pair of members carries every call, event batch and "
                                  "relayed exec socket)", registry=r)
        self.links = Gauge("execbroker_member_links", "Member links up on this member", registry=r)
        self._scraped = _Scraped(instances, ops)
        r.register(self._scraped)
        self._instances_only = CollectorRegistry(auto_describe=False)  # for a restricted caller
        self._restricted = _Scraped(instances, ops, operations=False)
        self._instances_only.register(self._restricted)

    def samples(self) -> list[Any]:
        """This process's own figures (not the instances', which the agent reads), as JSON for the agent
        to add to its scrape: ``[[family, type, help, unit, [[sample, labels, value], ...]], ...]``."""
        return [[m.name, m.type, m.documentation, m.unit, [[s.name, s.labels, s.value] for s in m.samples]]
                for m in self.registry.collect() if not m.name.startswith(INSTANCE_PREFIX)]

    def render(self, allows: Callable[[str], bool] | None = None, others: list[list[Any]] | None = None) -> bytes:
        """The metrics; for a caller restricted to some projects (``allows``), only those projects'
        instance series (the broker's own counters are the whole member's). ``others``: the ``samples()``
        of this node's worker processes, added to ours."""
        if allows is None:
            if others:
                merged = CollectorRegistry(auto_describe=False)
                merged.register(_Summed(self.registry, others))
                return generate_latest(merged)
            return generate_latest(self.registry)
        self._restricted.allows = allows  # collect() runs inside generate_latest, on this thread
        try:
            return generate_latest(self._instances_only)
        finally:
            self._restricted.allows = _nothing


class _Summed:
    """A registry's families with the same families of other processes added, sample by sample."""

    def __init__(self, registry: CollectorRegistry, others: list[list[Any]]) -> None:
        self.registry = registry
        self.others = others

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        kinds: dict[str, tuple[str, str, str]] = {}
        for other in self.others:
            for name, kind, doc, unit, samples in other:
                kinds.setdefault(name, (kind, doc, unit))
                family = extra.setdefault(name, {})
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    family[key] = family.get(key, 0.0) + float(value)
        for metric in self.registry.collect():
            added = extra.pop(metric.name, {})
            yield _with(metric, added)
        for name, added in extra.items():  # a family only a worker has samples of now
            kind, doc, unit = kinds[name]
            yield _with(Metric(name, doc, kind, unit), added)


def _with(metric: Metric, added: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> Metric:
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    for sample in metric.samples:
        key = (sample.name, tuple(sorted(sample.labels.items())))
        out.add_sample(sample.name, sample.labels, sample.value + added.pop(key, 0.0), sample.timestamp,
                       sample.exemplar)
    for (name, labels), value in added.items():
        out.add_sample(name, dict(labels), value)
    return out


class _Scraped:
    """What is read at scrape time: the instances' cgroups, the operations."""

    def __init__(self, instances: InstanceManager, ops: OperationRegistry, operations: bool = True) -> None:
        self.instances = instances
        self.ops = ops
        self.operations = operations
        self.allows: Callable[[str], bool] = _everything if operations else _nothing

    def describe(self) -> list[Metric]:
        return []  # nothing fixed to check names against: collected fresh each scrape

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily("lxd_cpu_seconds", "The total number of CPU time used in seconds.",
                                  labels=("cpu", "mode", *LABELS))
        oom = CounterMetricFamily("lxd_memory_OOM_kills", "The number of out of memory kills.", labels=LABELS)
        procs = GaugeMetricFamily("lxd_procs_total", "The number of running processes.", labels=LABELS)
        memory: dict[str, GaugeMetricFamily] = {}
        for inst in self.instances.list():
            if inst.status not in ("Running", "Frozen") or not self.allows(inst.project):
                continue
            figures = self.instances.figures(records.key(inst.project, inst.name))
            if figures is None:
                continue
            labels = [inst.project, inst.name, "container"]
            for (cpu_id, mode), seconds in sorted(figures.cpu.items()):
                cpu.add_metric([cpu_id, mode, *labels], seconds)
            for kind, value in sorted(figures.memory.items()):
                family = memory.get(kind)
                if family is None:
                    family = memory[kind] = GaugeMetricFamily(f"lxd_memory_{kind}_bytes",
                                                              f"The amount of {kind} memory.", labels=LABELS,
                                                              unit="bytes")
                family.add_metric(labels, value)
            if figures.oom_kills is not None:
                oom.add_metric(labels, figures.oom_kills)
            if figures.processes is not None:
                procs.add_metric(labels, figures.processes)
        yield cpu
        yield from memory.values()
        yield oom
        yield procs
        if self.operations:
            yield self._operations()

    def _operations(self) -> Metric:
        family = GaugeMetricFamily("execbroker_operations", "Operations this member holds, by class and status",
                                   labels=("class", "status"))
        counts: dict[tuple[str, str], int] = {}
        for op in self.ops.list(None):
            key = (op.cls, op.status.text)
            counts[key] = counts.get(key, 0) + 1
        for (op_class, status), n in sorted(counts.items()):
            family.add_metric([op_class, status], n)
        return family


def _everything(_project: str) -> bool:
    return True


def _nothing(_project: str) -> bool:
    return False


def exec_mode(post: Any) -> str:
    if not post.wait_for_websocket:
        return "task"
    return "interactive" if post.interactive else "websocket"
