"""What every workload gets: the broker under test, a client, the run's size, the profiler hook."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.harness import BrokerProcess
from bench.wire import Api


@dataclass
class Context:
    quick: bool
    broker: BrokerProcess | None
    api: Api | None
    profile: Callable[[str, float], contextlib.AbstractAsyncContextManager[dict[str, Any]]] | None = None
    lxd_available: bool | None = None  # real LXD answering on its default socket (a baseline)
    lxd_why: str = ""
    baselines: dict[str, Any] = field(default_factory=dict)  # measured outside the workload (ray start)
    notes: list[str] = field(default_factory=list)

    def n(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def seconds(self, quick: float, full: float) -> float:
        return quick if self.quick else full

    @property
    def agent_pid(self) -> int:
        assert self.broker is not None and self.broker.agent_pid is not None
        return self.broker.agent_pid

    def lxc(self, *args: str, real_lxd: bool = False, timeout: float = 120,
            **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """The real Debian `lxc` client against the broker (LXD_DIR), or against real LXD."""
        env = self._lxc_env(real_lxd)
        kw.setdefault("stdin", subprocess.DEVNULL)  # never the caller's terminal (it would go interactive)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.run(["lxc", *args], env=env, timeout=timeout, **kw)

    def shell(self, script: str, real_lxd: bool | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """``sh -c script``; with real_lxd set, `lxc` in it talks to the broker (False) or to real LXD (True)."""
        env = None if real_lxd is None else self._lxc_env(real_lxd)
        return subprocess.run(["sh", "-c", script], env=env, timeout=timeout, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _lxc_env(self, real_lxd: bool) -> dict[str, str]:
        """The client's config in the bench's home; LXD_DIR names the broker, or is unset for real LXD
        (/var/lib/lxd/unix.socket)."""
        assert self.broker is not None
        env = self.broker.lxc_env()
        if real_lxd:
            del env["LXD_DIR"]
        return env

    def check_lxd(self) -> bool:
        """Whether real LXD answers `lxc exec c1 -- true` (once per run)."""
        if self.lxd_available is None:
            try:
                r = self.lxc("exec", "c1", "--", "true", real_lxd=True, timeout=20)
                self.lxd_available = r.returncode == 0
                self.lxd_why = "" if self.lxd_available else r.stderr.decode(errors="replace").strip()[:200]
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.lxd_available, self.lxd_why = False, str(exc)
        return self.lxd_available
