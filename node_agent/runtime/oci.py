"""An instance's OCI bundle (``config.json``), generated from its definition: what makes the container a
security boundary. IO-free; ``runc.py`` runs it.

* user namespace: root inside is the host uid ``idmap.base`` (a per-instance range of 65536 ids);
* pid, mount, uts, ipc, cgroup and network namespaces (the network one holds only ``lo``), pivot_root;
* capabilities no wider than Docker's default set (narrower than LXC's unprivileged default: no
  CAP_SYS_PTRACE, so nothing inside may trace pid1), each scoped to the user namespace anyway;
* a seccomp filter (default allow) refusing with EPERM what LXC's and Docker's defaults refuse: kernel
  modules, kexec, ``open_by_handle_at``, the kernel keyring, ``bpf``, ``perf_event_open``, mounts and
  swap, clocks, reboot, ``userfaultfd``, ``setns``, io_uring, new namespaces (``unshare``, ``clone``) and
  more, for every ABI of the machine (no 32-bit way around it);
* ``/proc/sys``, ``/proc/sysrq-trigger`` and ``/sys`` read-only, ``/proc/kcore``-class paths masked, a
  minimal ``/dev``, ``nodev`` and ``nosuid`` everywhere else;
* ``no_new_privs`` off unless ``security.no_new_privs`` (setuid programs inside work, as in LXD);
* the limits (``limits.memory``, ``limits.cpu``, ``limits.processes``) and rlimits.
"""

from __future__ import annotations

import platform
from typing import Any

from node_agent.runtime.limits import Limits
from node_agent.runtime.pid1_runtime import MOUNT as RUNTIME_MOUNT
from node_agent.runtime.rootfs import Bind

ID_RANGE = 65536
PID1_LISTEN_FD, PID1_READY_FD = 3, 4  # what runc --preserve-fds=2 hands pid1
CAPABILITIES = [  # Docker's default set
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
DENIED_SYSCALLS = [
    # kernel modules and kexec
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
    "kexec_load", "kexec_file_load",
    # file handles (the shocker escape), the keyring, eBPF, perf
    "open_by_handle_at", "name_to_handle_at", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "lookup_dcookie", "userfaultfd",
    # mounts, swap, quotas, accounting, the kernel log
    "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "swapon", "swapoff", "quotactl", "quotactl_fd", "acct", "syslog", "nfsservctl",
    # clocks, reboot, raw io, old or risky interfaces
    "settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex",
    "reboot", "iopl", "ioperm", "uselib", "vm86", "vm86old", "kcmp",
    # entering namespaces, io_uring (a large attack surface that seccomp cannot see into)
    "setns", "io_uring_setup", "io_uring_enter", "io_uring_register",
]
# New namespaces (above all a user namespace, where a process gains every capability again): refused for
# unshare and clone as in Docker's default; clone3, whose flags seccomp cannot read, says ENOSYS, and the
# C library falls back to clone.
NAMESPACE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                   "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                   "CLONE_NEWNET": 0x40000000}
CLONE_NEWTIME = 0x00000080  # unshare only: in clone's flags these bits are the exit signal
ENOSYS = 38
# Socket families a network namespace does not fence in: vsock reaches the hypervisor and the host (as
# Docker refuses it), alg is the kernel's crypto API. 32-bit socketcall hides its arguments from
# seccomp, so it is refused too (C libraries since 2015 use the direct socket calls).
DENIED_FAMILIES = {"AF_ALG": 38, "AF_VSOCK": 40}
EAFNOSUPPORT = 97
ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def bundle(*, hostname: str, id_base: int, pid1_argv: list[str], pid1_env: list[str], runtime_dir: str,
           binds: list[Bind], limits: Limits, cgroup_path: str, no_new_privs: bool = False,
           max_files: int = 65536) -> dict[str, Any]:
    """The runtime spec of one instance; ``rootfs/`` next to it holds the root filesystem."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        # the instance's own cgroups, read-only: its limits and usage (runtimes size themselves by them,
        # and pid1 watches pids.events)
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        # /tmp stays on the rootfs (disk, as in LXD); /run is a small tmpfs, charged to the instance's memory
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755", "size=65536k"]},
        {"destination": RUNTIME_MOUNT, "type": "bind", "source": runtime_dir,
         "options": ["rbind", "ro", "nosuid", "nodev"]},
    ]
    for b in binds:
        mounts.append({"destination": b.target, "type": "bind", "source": b.source,
                       "options": ["rbind", "nosuid", "nodev", *(["ro"] if b.readonly else [])]})
    arch = ARCHITECTURES.get(platform.machine(), [])
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": pid1_argv,
            "env": [f"PATH={PATH}", *pid1_env],
            "cwd": "/",
            "capabilities": {k: list(CAPABILITIES) for k in ("bounding", "effective", "permitted")},
            # inside a user namespace a limit cannot rise above runc's own: the caller says what it has
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": max_files, "soft": min(max_files, 65536)},
                        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            "noNewPrivileges": no_new_privs,
        },
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": id_base, "size": ID_RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": id_base, "size": ID_RANGE}],
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup", "user")],
            "cgroupsPath": cgroup_path,
            "resources": limits.resources(),
            "maskedPaths": MASKED,
            "readonlyPaths": READ_ONLY,
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": arch,
                "syscalls": seccomp_rules(),
            },
        },
    }


def seccomp_rules() -> list[dict[str, Any]]:
    """EPERM for the denied calls and for any new namespace; ENOSYS for clone3; EAFNOSUPPORT for the
    denied socket families."""
    rules: list[dict[str, Any]] = [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    for name, flags in (("unshare", [*NAMESPACE_FLAGS.values(), CLONE_NEWTIME]), ("clone", NAMESPACE_FLAGS.values())):
        rules += [{"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                   "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]}
                  for flag in flags]
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    rules += [{"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT,
               "args": [{"index": 0, "value": family, "op": "SCMP_CMP_EQ"}]} for family in DENIED_FAMILIES.values()]
    rules.append({"names": ["socketcall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1})
    return rules
