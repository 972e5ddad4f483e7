"""Two real hosts: two network namespaces joined by a veth pair whose addresses exist only inside this
test, each with its own PID namespace; a Ray head and execbroker in one, a joining node in the other,
and an exec forwarded between them over that link."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Endpoint, assert_no_leftovers, private_base, wait_for

EB = str(Path(sys.executable).parent / "execbroker")
pytestmark = pytest.mark.skipif(shutil.which("ip") is None or os.geteuid() != 0,
                                reason="needs root and iproute2")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    netns: str
    address: str
    device: str = ""
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str]) -> None:
        # PID 1 of a new PID namespace: when it ends, the kernel ends everything the host started. nsenter,
        # not `ip netns exec`: that mounts a sysfs of its own over /sys, hiding the cgroup hierarchies runc needs.
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "-pf", "--mount-proc", EB, "up", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError("broker exited:\n" + "".join(self.lines))
        return any("serving on" in line for line in self.lines)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)  # unshare forwards nothing: signal the whole session
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture()
def two_hosts() -> Iterator[tuple[Host, Host, Path]]:
    tag = secrets.token_hex(3)
    net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    a, b = Host(f"eba-{tag}", f"{net}.1", f"va-{tag}"), Host(f"ebb-{tag}", f"{net}.2", f"vb-{tag}")
    base = private_base("eb2h-")
    (base / "home").mkdir()
    try:
        for h in (a, b):
            ip("netns", "add", h.netns)
            ip("-n", h.netns, "link", "set", "lo", "up")
        ip("link", "add", f"va-{tag}", "type", "veth", "peer", "name", f"vb-{tag}")
        for h, dev in ((a, f"va-{tag}"), (b, f"vb-{tag}")):
            ip("link", "set", dev, "netns", h.netns)
            ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", dev)
            ip("-n", h.netns, "link", "set", dev, "up")
        yield a, b, base
    finally:
        for h in (b, a):
            h.stop()
        for h in (a, b):
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
        assert_no_leftovers(base, 30)
        shutil.rmtree(base, ignore_errors=True)


def _tcp_payloads(pcap: bytes) -> list[tuple[int, int, bytes]]:
    """(source port, destination port, payload) of each IPv4 TCP segment in a pcap file (Ethernet)."""
    magic = struct.unpack("<I", pcap[:4])[0]
    order = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    segments, offset = [], 24
    while offset + 16 <= len(pcap):
        incl = struct.unpack(order + "I", pcap[offset + 8:offset + 12])[0]
        frame = pcap[offset + 16:offset + 16 + incl]
        offset += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
            continue
        ip = frame[14:]
        tcp = ip[(ip[0] & 0x0F) * 4:]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack(">HH", tcp[:4])
        segments.append((sport, dport, tcp[(tcp[12] >> 4) * 4:]))
    return segments


def test_exec_forwarded_between_two_hosts(two_hosts: tuple[Host, Host, Path]) -> None:
    a, b, base = two_hosts
    env = {**os.environ, "RAY_TMPDIR": str(base / "ray")}
    a.start("--cluster", "--node-name", "hosta", "--node-ip", a.address, "--dir", str(base / "a"),
            env={**env, "EXECBROKER_DEFAULT_INSTANCE": "c1"})
    wait_for(a.serving, 180, "host a serving")
    join = next(line.split("--address ")[1].split()[0] for line in a.lines if "--address" in line)
    assert join.startswith(a.address)
    b.start("--address", join, "--node-name", "hostb", "--node-ip", b.address, "--dir", str(base / "b"),
            env={**env, "EXECBROKER_DEFAULT_INSTANCE": ""})
    wait_for(b.serving, 180, "host b serving")

    ep_b = Endpoint(base=base, data_dir=base / "b")
    members = {m["server_name"]: m for m in ep_b.api("GET", "/1.0/cluster/members?recursion=1")["metadata"]}
    assert a.address in members["hosta"]["url"]  # member traffic goes over the veth link
    assert b.address in members["hostb"]["url"]
    member_port = int(members["hosta"]["url"].rsplit(":", 1)[1])

    # everything on the link between the two hosts, while b forwards an exec to a and issues a token
    capture = base / "link.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", a.netns, "tcpdump", "-i", a.device, "-U", "-s", "0",
                             "-w", str(capture)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: capture.exists(), 30, "tcpdump to start")
        marker = secrets.token_hex(8)
        r = ep_b.lxc("exec", "c1", "--", "sh", "-c", f"echo out-{marker}; hostname; head -c 3000000 /dev/zero | wc -c;"
                     " exit 6")
        assert (r.returncode, r.stdout.split()) == (6, [f"out-{marker}".encode(), b"c1", b"3000000"]), r.stderr
        data = os.urandom(1 << 20)
        assert ep_b.lxc("exec", "c1", "--", "cat", input=data).stdout == data
        token = ep_b.lxc("config", "trust", "add", "--name", "captured").stdout.decode().strip().splitlines()[-1]
        secret = json.loads(base64.b64decode(token))["secret"]
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(30)
    segments = _tcp_payloads(capture.read_bytes())
    member = b"".join(p for sport, dport, p in segments if member_port in (sport, dport))
    everything = b"".join(p for _, _, p in segments)
    assert len(member) > 1 << 20  # the exec's bytes crossed the member link...
    assert member[:1] == b"\x16" or b"\x17\x03\x03" in member  # ...as TLS records
    for clear in (f"out-{marker}".encode(), marker.encode(), data[:64], secret.encode(), b"HTTP/1.1",
                  b"X-Execbroker"):
        assert clear not in everything, clear  # not on the member link, not in Ray's traffic either

    inst = ep_b.api("GET", "/1.0/instances/c1")["metadata"]
    assert inst["location"] == "hosta"
    # c1 lives in host a's PID namespace: stopping host a ends it; delete it first all the same
    op = ep_b.api("PUT", "/1.0/instances/c1/state", {"action": "stop", "force": True})
    ep_b.wait_op(op["operation"])
    op = ep_b.api("DELETE", "/1.0/instances/c1")
    assert ep_b.wait_op(op["operation"])["status"] == "Success"
