"""The resource limits of an instance, from its Incus config keys: ``limits.memory`` (bytes with a
unit, or a percentage of the host's memory), ``limits.cpu`` (a number of CPUs, or a CPU set such as
``0-1,3``), ``limits.processes``. IO-free: the OCI resources they become and the ``runc update``
arguments that change them live."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any

from core.errors import BadRequest

KEYS = ("limits.memory", "limits.cpu", "limits.processes")
CPU_PERIOD = 100_000  # microseconds
_UNITS = {"": 1, "B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20,
          "GiB": 2**30, "TiB": 2**40}
_MEMORY = re.compile(r"^([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*([A-Za-z]*)$")
_CPUSET = re.compile(r"^[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?){0,63}$")
MIN_MEMORY = 4 << 20  # below this not even pid1 fits
MAX_MEMORY = 1 << 50  # 1 PiB: beyond any host, and far from the kernel's own limit
MAX_CPUS = 4096
MAX_PROCESSES = 4 << 20  # the kernel's highest pid_max


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpu_quota: int | None = None  # microseconds per CPU_PERIOD
    cpuset: str | None = None
    processes: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, str]) -> Limits:
        memory = parse_memory(config["limits.memory"]) if config.get("limits.memory") else None
        quota, cpuset = parse_cpu(config["limits.cpu"]) if config.get("limits.cpu") else (None, None)
        processes = parse_processes(config["limits.processes"]) if config.get("limits.processes") else None
        return cls(memory, quota, cpuset, processes)

    def with_default_processes(self, count: int) -> Limits:
        """These limits, with ``count`` processes where ``limits.processes`` is unset: one instance must not
        take every pid of the host."""
        return self if self.processes is not None else replace(self, processes=count)

    def resources(self) -> dict[str, Any]:
        """The OCI ``linux.resources`` (what is not limited is left out)."""
        out: dict[str, Any] = {}
        if self.memory is not None:
            out["memory"] = {"limit": self.memory}
        cpu: dict[str, Any] = {}
        if self.cpu_quota is not None:
            cpu.update(quota=self.cpu_quota, period=CPU_PERIOD)
        if self.cpuset is not None:
            cpu["cpus"] = self.cpuset
        if cpu:
            out["cpu"] = cpu
        if self.processes is not None:
            out["pids"] = {"limit": self.processes}
        return out

    def runc_update_args(self) -> list[str]:
        """``runc update`` flags that set every limit (an unset one is lifted)."""
        return [f"--memory={self.memory if self.memory is not None else -1}",
                f"--cpu-quota={self.cpu_quota if self.cpu_quota is not None else -1}",
                f"--cpu-period={CPU_PERIOD}",
                *([f"--cpuset-cpus={self.cpuset}"] if self.cpuset is not None else []),
                f"--pids-limit={self.processes if self.processes is not None else -1}"]


def parse_memory(value: str) -> int:
    value = value.strip()
    if value.endswith("%"):
        try:
            share = float(value[:-1])
        except ValueError:
            raise BadRequest(f'Invalid limits.memory "{value}"') from None
        if not 0 < share <= 100:
            raise BadRequest(f'Invalid limits.memory "{value}": a percentage is 1 to 100')
        amount = int(host_memory() * share / 100)
    else:
        m = _MEMORY.match(value)
        if m is None or m.group(2) not in _UNITS:
            raise BadRequest(f'Invalid limits.memory "{value}": use a size such as 512MiB or 2GB, or a percentage')
        amount = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not MIN_MEMORY <= amount <= MAX_MEMORY:
        raise BadRequest(f'Invalid limits.memory "{value}": from {MIN_MEMORY >> 20}MiB to {MAX_MEMORY >> 50}PiB')
    return amount


def parse_cpu(value: str) -> tuple[int | None, str | None]:
    """A count of CPUs (``2``: two CPUs' worth of time) or a set of CPUs (``0-1,3``: only those)."""
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 5:
        count = int(value)
        if not 1 <= count <= MAX_CPUS:
            raise BadRequest(f'Invalid limits.cpu "{value}": from 1 to {MAX_CPUS}')
        return count * CPU_PERIOD, None
    if _CPUSET.match(value) and ("-" in value or "," in value):
        return None, value
    raise BadRequest(f'Invalid limits.cpu "{value}": a number of CPUs or a CPU set such as 0-1,3')


def parse_processes(value: str) -> int:
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 8 and 2 <= int(value) <= MAX_PROCESSES):
        raise BadRequest(f'Invalid limits.processes "{value}": a whole number from 2 to {MAX_PROCESSES}')
    return int(value)
