"""An instance is a security boundary: root inside, through the real ``lxc exec``, cannot affect the host or
another instance (the escape battery), the limits hold (memory, processes, CPU), and the state reports real
usage. Each check fails on an instance that is not an unprivileged container."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.runtime import cgroups
from node_agent.service import cgroup_parent
from tests.conftest import Broker, wait_for

pytestmark = pytest.mark.broker

PROBES = Path(__file__).with_name("escape_probes.py")


def launch(broker: Broker, name: str, *args: str) -> str:
    r = broker.lxc("launch", *args, name, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    return name


def remove(broker: Broker, name: str) -> None:
    broker.lxc("delete", "--force", name)


@pytest.fixture(scope="module")
def host1(broker: Broker) -> Iterator[str]:
    """A ``host`` instance: the host's /usr (python3 included) and /etc, read-only, under the user namespace."""
    yield launch(broker, "iso-host", "host")
    remove(broker, "iso-host")


@pytest.fixture(scope="module")
def probes(broker: Broker, host1: str) -> dict[str, str]:
    """Every probe of escape_probes.py, run once as root inside ``host1``: name -> what happened."""
    agent = broker.api("GET", "/1.0")["metadata"]["environment"]["server_pid"]
    r = broker.lxc("exec", host1, "--env", f"AGENT_PID={agent}", "--", "python3", "-", input=PROBES.read_bytes(),
                   timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return dict(json.loads(r.stdout))


# (probe, what refusal looks like): EPERM from seccomp or the missing capability, EROFS from the
# read-only mounts, EACCES where a host-owned file is nobody's inside.
BATTERY = [
    ("write /proc/sys/kernel/core_pattern", "EROFS"),
    ("write /proc/sysrq-trigger", "EROFS|ENOENT"),  # ENOENT: a kernel without magic SysRq
    ("write /sys/kernel/uevent_helper", "EROFS"),
    ("mknod a block device (the host's root disk)", "EPERM"),
    ("mount a block device", "EPERM"),
    ("mount proc elsewhere", "EPERM"),
    ("finit_module (load a kernel module)", "EPERM"),
    ("init_module", "EPERM"),
    ("delete_module", "EPERM"),
    ("kexec_load", "EPERM"),
    ("reboot(2)", "EPERM"),
    ("open_by_handle_at (the shocker escape)", "EPERM"),
    ("name_to_handle_at", "EPERM"),
    ("bpf", "EPERM"),
    ("perf_event_open", "EPERM"),
    ("keyctl", "EPERM"),
    ("unshare a user namespace", "EPERM"),
    ("unshare a network namespace", "EPERM"),
    ("setns", "EPERM"),
    ("io_uring_setup", "EPERM"),
    ("swapon", "EPERM"),
    ("settimeofday", "EPERM"),
    ("iopl", "EPERM"),
    ("ptrace pid1", "EPERM"),
    ("write /proc/1/exe (pid1's interpreter)", "EACCES"),
    ("open /proc/1/map_files", "EACCES"),
    ("write /proc/self/exe", "ETXTBSY|EACCES|EROFS"),
    ("read /etc/shadow of the host", "EACCES"),
    ("add a network interface", "EPERM"),
    ("open a vsock socket (to the hypervisor or host)", "EAFNOSUPPORT"),
    ("open an AF_ALG socket", "EAFNOSUPPORT"),
]


@pytest.mark.parametrize("probe, refusal", BATTERY, ids=[p for p, _ in BATTERY])
def test_escape_battery(probes: dict[str, str], probe: str, refusal: str) -> None:
    assert probes[probe] in refusal.split("|"), f"{probe}: {probes[probe]}"


def test_no_host_network_or_processes(probes: dict[str, str]) -> None:
    assert probes["network interfaces"] == "lo"
    inside = [int(p) for p in probes["processes"].split()]
    assert inside[0] == 1 and len(inside) < 10  # pid1 and the probe's own: no host process is visible
    assert probes["signal the agent's host pid"] in ("ESRCH", "not the agent")


def test_chroot_escape_stays_inside(probes: dict[str, str]) -> None:
    """chroot into a subdirectory, walk up with '..', chroot there: still the instance's root."""
    assert probes["chroot escape"] == "still inside"


def test_capabilities_and_seccomp(probes: dict[str, str]) -> None:
    caps = int(probes["CapEff"], 16)
    assert caps == 0xA80425FB  # Docker's default set: no CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, ...
    assert probes["Seccomp"] == "2"
    assert probes["NoNewPrivs"] == "0"  # setuid inside works, as in LXD


def test_root_inside_is_unprivileged_on_the_host(broker: Broker, c1: str) -> None:
    marker = f"sleep {400000 + secrets.randbelow(99999)}"
    lxc = subprocess.Popen(["lxc", "exec", c1, "--", "sh", "-c", f"exec {marker}"], env=broker.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = wait_for(lambda: _host_pid_of(marker), 30, "the command to show on the host")
        uid = _status_ids(pid, "Uid")
        base = _id_base(broker, c1)
        assert uid == [base] * 4 and base >= 1_000_000, (uid, base)
        assert _status_ids(pid, "Gid") == [base] * 4
    finally:
        lxc.kill()
        lxc.wait()


def test_another_instances_files_are_out_of_reach(broker: Broker, c1: str) -> None:
    other = launch(broker, "iso-other", "busybox")
    try:
        name = f"secret-{secrets.token_hex(4)}"
        assert broker.lxc("exec", other, "--", "sh", "-c", f"echo s3cret > /root/{name}").returncode == 0
        r = broker.lxc("exec", c1, "--", "find", "/", "-name", name)
        assert name.encode() not in r.stdout
        # from the host side too: c1's root (its host uid) may not read the other instance's files
        target = broker.data_dir / "instances" / other / "rootfs" / "root" / name
        base = _id_base(broker, c1)
        r2 = subprocess.run(["setpriv", f"--reuid={base}", f"--regid={base}", "--clear-groups", "cat", str(target)],
                            capture_output=True)
        assert r2.returncode != 0 and b"Permission denied" in r2.stderr, r2
    finally:
        remove(broker, other)


# ------------------------------------------------------------------------------------------ limits


@pytest.fixture()
def limited(broker: Broker) -> Iterator[str]:
    yield launch(broker, "iso-limited", "busybox", "-c", "limits.memory=64MiB", "-c", "limits.processes=64",
                 "-c", "limits.cpu=1")
    remove(broker, "iso-limited")


def test_memory_hog_is_killed_and_the_instance_serves(broker: Broker, limited: str) -> None:
    r = broker.lxc("exec", limited, "--", "sh", "-c", "head -c 400m /dev/zero | tail > /dev/null")
    assert r.returncode == 137, r
    r = broker.lxc("exec", limited, "--", "echo", "still here")
    assert (r.returncode, r.stdout) == (0, b"still here\n")
    state = broker.api("GET", f"/1.0/instances/{limited}/state")["metadata"]
    assert state["memory"]["usage_peak"] >= 32 << 20  # the hog got that far before the kill


def test_fork_bomb_is_contained_and_the_next_exec_runs(broker: Broker, limited: str) -> None:
    events = _group_file(broker, limited, "pids", "pids.events")
    # ash exits when a fork fails: what the bomb leaves behind keeps every process slot taken
    r = broker.lxc("exec", limited, "--", "sh", "-c", "while :; do sleep 1000 & done", timeout=120)
    assert r.returncode == 2 and b"can't fork" in r.stderr
    assert int(events.read_text().split()[1]) > 0  # forks failed at the limit ...
    assert int(_group_file(broker, limited, "pids", "pids.current").read_text()) <= 64  # ... and it held
    r = broker.lxc("exec", limited, "--", "sh", "-c", "echo next | cat")  # a pipeline: needs two processes
    assert (r.returncode, r.stdout) == (0, b"next\n"), r.stderr
    r = broker.lxc("exec", limited, "--", "pidof", "sleep")
    assert (r.returncode, r.stdout) == (1, b""), r.stdout  # the bomb's leftovers were reclaimed


def test_background_jobs_outlive_their_exec_when_there_is_room(broker: Broker, limited: str) -> None:
    assert broker.lxc("exec", limited, "--", "sh", "-c", "sleep 1001 > /dev/null 2>&1 &").returncode == 0
    assert broker.lxc("exec", limited, "--", "sh", "-c", "ps | grep -v grep | grep -q 'sleep 1001'").returncode == 0


def test_limits_reach_the_cgroups_and_change_live(broker: Broker, limited: str) -> None:
    files = cgroups.limit_files(f"/{cgroup_parent(broker.data_dir)}/{limited}")
    assert int(files["memory"].read_text()) == 64 << 20
    assert int(files["pids"].read_text()) == 64
    assert int(files["cpu"].read_text().split()[0]) == 100_000  # one CPU's worth per 100 ms period
    assert broker.lxc("config", "set", limited, "limits.cpu", "2").returncode == 0
    assert broker.lxc("config", "set", limited, "limits.memory", "128MiB").returncode == 0
    assert int(files["cpu"].read_text().split()[0]) == 200_000
    assert int(files["memory"].read_text()) == 128 << 20
    r = broker.lxc("exec", limited, "--", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if r.returncode == 0:  # cgroup v1: the instance sees its own limit too
        assert r.stdout.strip() == str(128 << 20).encode()
    r = broker.lxc("config", "set", limited, "limits.memory", "lots")
    assert r.returncode != 0 and b"limits.memory" in r.stderr


def test_an_instance_without_limits_still_has_a_process_bound(broker: Broker, c1: str) -> None:
    """No limits.processes: an eighth of the host's pids (at least 256), so one fork bomb cannot take them all."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert int(_group_file(broker, c1, "pids", "pids.max").read_text()) == max(256, pid_max // 8)


def test_state_reports_usage_from_the_cgroups(broker: Broker, limited: str) -> None:
    lxc = subprocess.Popen(["lxc", "exec", limited, "--", "sh", "-c", "sleep 30 & sleep 31 & wait"],
                           env=broker.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        state = wait_for(lambda: _state_with(broker, limited, 4), 30, "the sleeps to be counted")
        assert state["memory"]["usage"] > 0 and state["cpu"]["usage"] > 0
        assert state["pid"] > 0 and state["status"] == "Running"
    finally:
        lxc.kill()
        lxc.wait()


# ----------------------------------------------------------------------------------------- helpers


def _state_with(broker: Broker, name: str, processes: int) -> dict | None:
    state = broker.api("GET", f"/1.0/instances/{name}/state")["metadata"]
    return state if state["processes"] >= processes else None


def _host_pid_of(cmdline: str) -> int | None:
    needle = cmdline.replace(" ", "\0").encode() + b"\0"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == needle:
                    return int(entry)
            except OSError:
                pass
    return None


def _status_ids(pid: int, field: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _id_base(broker: Broker, name: str) -> int:
    return int(json.loads((broker.data_dir / "instances" / name / "instance.json").read_text())["id_base"])


def _group_file(broker: Broker, name: str, controller: str, filename: str) -> Path:
    path = cgroups.controller_dir(controller, f"/{cgroup_parent(broker.data_dir)}/{name}")
    assert path is not None, f"no {controller} controller on this host"
    return path / filename
