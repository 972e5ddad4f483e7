"""The escape battery's probes, run as root inside a ``host`` instance by tests/test_isolation.py (fed to
``python3 -`` there, so stdlib only). Each probe tries one way out and records what happened: "ok" (the
attempt worked: a failed check), an errno name, or an observation. Prints one JSON object."""

import ctypes
import errno
import json
import os
import socket
import struct

libc = ctypes.CDLL(None, use_errno=True)
results = {}
NR = {"init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246, "reboot": 169,
      "open_by_handle_at": 304, "name_to_handle_at": 303, "bpf": 321, "perf_event_open": 298, "keyctl": 250,
      "unshare": 272, "setns": 308, "io_uring_setup": 425, "swapon": 167, "settimeofday": 164, "iopl": 172,
      "ptrace": 101, "mount": 165}


def syscall(name, *args):
    ret = libc.syscall(ctypes.c_long(NR[name]), *args)
    return "ok" if ret >= 0 else errno.errorcode[ctypes.get_errno()]


def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))


def write(path, data="x"):
    with open(path, "w") as f:
        f.write(data)


root_dev = os.stat("/etc/hostname").st_dev  # the host's disk, seen through the read-only /etc bind
attempt("write /proc/sys/kernel/core_pattern", lambda: write("/proc/sys/kernel/core_pattern", "|/tmp/x"))
attempt("write /proc/sysrq-trigger", lambda: write("/proc/sysrq-trigger", "b"))
attempt("write /sys/kernel/uevent_helper", lambda: write("/sys/kernel/uevent_helper", "/tmp/x"))
attempt("mknod a block device (the host's root disk)",
        lambda: os.mknod("/tmp/disk", 0o600 | 0o060000, os.makedev(os.major(root_dev), os.minor(root_dev))))
os.makedirs("/tmp/mnt", exist_ok=True)
results["mount a block device"] = syscall("mount", b"/dev/vda", b"/tmp/mnt", b"ext4", 0, None)
results["mount proc elsewhere"] = syscall("mount", b"proc", b"/tmp/mnt", b"proc", 0, None)
fd = os.open("/etc/hostname", os.O_RDONLY)
results["finit_module (load a kernel module)"] = syscall("finit_module", fd, b"", 0)
results["init_module"] = syscall("init_module", None, 0, b"")
results["delete_module"] = syscall("delete_module", b"loop", 0)
results["kexec_load"] = syscall("kexec_load", 0, 0, None, 0)
results["reboot(2)"] = syscall("reboot", 0xFEE1DEAD, 672274793, 0x4321FEDC, None)  # power off
handle = ctypes.create_string_buffer(struct.pack("II", 8, 1) + b"\0" * 8)
results["open_by_handle_at (the shocker escape)"] = syscall("open_by_handle_at", fd, handle, 0)
mount_id = ctypes.c_int()
results["name_to_handle_at"] = syscall("name_to_handle_at", -100, b"/etc/hostname", handle, ctypes.byref(mount_id), 0)
results["bpf"] = syscall("bpf", 0, None, 0)
results["perf_event_open"] = syscall("perf_event_open", None, 0, -1, -1, 0)
results["keyctl"] = syscall("keyctl", 0, 0, 0, 0, 0)
results["unshare a user namespace"] = syscall("unshare", 0x10000000)
results["unshare a network namespace"] = syscall("unshare", 0x40000000)
results["setns"] = syscall("setns", os.open("/proc/self/ns/net", os.O_RDONLY), 0)
results["io_uring_setup"] = syscall("io_uring_setup", 1, ctypes.create_string_buffer(120))
results["swapon"] = syscall("swapon", b"/etc/hostname", 0)
results["settimeofday"] = syscall("settimeofday", None, None)
results["iopl"] = syscall("iopl", 3)
results["ptrace pid1"] = syscall("ptrace", 16, 1, None, None)  # PTRACE_ATTACH
attempt("write /proc/1/exe (pid1's interpreter)", lambda: write("/proc/1/exe"))
attempt("open /proc/1/map_files", lambda: os.listdir("/proc/1/map_files"))
attempt("write /proc/self/exe", lambda: write("/proc/self/exe"))
attempt("read /etc/shadow of the host", lambda: open("/etc/shadow").read())
try:  # RTM_NEWLINK for a dummy interface
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:
        kind = b"dummy\0"
        linkinfo = struct.pack("HH", 4 + len(kind), 1) + kind + b"\0" * (-len(kind) % 4)
        attrs = struct.pack("HH", 4 + len(linkinfo), 18) + linkinfo  # IFLA_LINKINFO { IFLA_INFO_KIND }
        name = b"evil0\0\0\0"
        attrs += struct.pack("HH", 4 + 6, 3) + name  # IFLA_IFNAME
        body = struct.pack("BxHiII", 0, 0, 0, 0, 0) + attrs
        nl.send(struct.pack("IHHII", 16 + len(body), 16, 0x405, 1, 0) + body)  # NLM_F_REQUEST|ACK|CREATE|EXCL
        reply = nl.recv(4096)
        code = -struct.unpack_from("i", reply, 16)[0]
        results["add a network interface"] = "ok" if code == 0 else errno.errorcode.get(code, str(code))
except OSError as exc:
    results["add a network interface"] = errno.errorcode.get(exc.errno, str(exc.errno))
for family, name in ((40, "open a vsock socket (to the hypervisor or host)"), (38, "open an AF_ALG socket")):
    attempt(name, lambda family=family: socket.socket(family, socket.SOCK_STREAM if family == 40 else
                                                      socket.SOCK_SEQPACKET).close())
results["network interfaces"] = " ".join(sorted(os.listdir("/sys/class/net")))
results["processes"] = " ".join(sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int))
try:
    os.kill(int(os.environ.get("AGENT_PID", "0")) or 999999, 0)
    results["signal the agent's host pid"] = "not the agent"  # a process of ours happens to have that number
except OSError as exc:
    results["signal the agent's host pid"] = errno.errorcode[exc.errno]
os.makedirs("/tmp/jail", exist_ok=True)
top = os.open("/", os.O_RDONLY)
os.chroot("/tmp/jail")
os.fchdir(top)
for _ in range(64):
    os.chdir("..")
os.chroot(".")
results["chroot escape"] = "still inside" if os.path.isdir("/.execbroker") else "OUT: " + " ".join(os.listdir("/"))
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key in ("CapEff", "Seccomp", "NoNewPrivs"):
        results[key] = value.strip()
print(json.dumps(results))
