"""The host id range delegated to execbroker: clear of every other delegation and of account ids, written
once, and what instances are given ranges from."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.runtime import idranges
from node_agent.runtime.container import allocate_id_base
from node_agent.runtime.idranges import Range, choose, claim, delegated
from node_agent.runtime.launcher import LaunchError


def files(tmp_path: Path, subuid: str, subgid: str, passwd: str = "", group: str = "") -> dict[str, Path]:
    paths = {}
    for name, text in (("subuid", subuid), ("subgid", subgid), ("passwd", passwd), ("group", group)):
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


def test_choose_avoids_delegations_and_accounts() -> None:
    lxd = Range(1_000_000, 1_000_000_000)
    got = choose([lxd], [], count=65536 * 16)
    assert got.start >= lxd.end and got.start % 65536 == 0
    got = choose([Range(100_000, 65536)], [1_000_005], count=65536 * 16)
    assert got.start > 1_000_005 and got.start % 65536 == 0
    assert choose([], [], count=65536).start == idranges.FLOOR
    with pytest.raises(RuntimeError):
        choose([Range(0, 2**31)], [], count=65536)


def test_claim_writes_once_and_keeps_other_lines(tmp_path: Path) -> None:
    p = files(tmp_path, "root:1000000:1000000000\nalice:100000:65536\n", "root:1000000:1000000000\n",
              passwd="alice:x:1001000100:1001000100::/home/alice:/bin/sh\n")
    first = claim(p["subuid"], p["subgid"], p["passwd"], p["group"])
    assert first.start > 1_001_000_100 and first.count == idranges.PER_INSTANCE * idranges.INSTANCES
    assert "alice:100000:65536" in p["subuid"].read_text()
    assert delegated(p["subuid"], p["subgid"]) == first
    assert claim(p["subuid"], p["subgid"], p["passwd"], p["group"]) == first  # already there: unchanged
    assert p["subuid"].read_text().count("execbroker:") == 1


def test_mismatched_files_are_not_a_delegation(tmp_path: Path) -> None:
    p = files(tmp_path, "execbroker:2000000:65536\n", "execbroker:3000000:65536\n")
    assert delegated(p["subuid"], p["subgid"]) is None


def test_instances_take_distinct_ranges_inside_the_delegation() -> None:
    ids = Range(10 * 65536, 3 * 65536)
    first = allocate_id_base(set(), ids)
    second = allocate_id_base({first}, ids)
    third = allocate_id_base({first, second}, ids)
    assert [first, second, third] == [ids.start, ids.start + 65536, ids.start + 2 * 65536]
    with pytest.raises(LaunchError, match="No free id range"):
        allocate_id_base({first, second, third}, ids)


def test_file_capabilities_survive_the_shift_rooted_in_the_instance(tmp_path: Path) -> None:
    """chown drops security.capability: the shift puts it back as a namespaced (v3) capability."""
    import os
    import struct

    from node_agent.runtime import idshift

    if os.geteuid() != 0:
        pytest.skip("needs root (chown, security.* xattrs)")
    tool = tmp_path / "rootfs" / "usr" / "bin" / "ping"
    tool.parent.mkdir(parents=True)
    tool.write_bytes(b"\x7fELF")
    v2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw, effective
    os.setxattr(tool, idshift.CAPS, v2)
    assert idshift.shift(tmp_path / "rootfs", 5 * 65536) >= 1
    raw = os.getxattr(tool, idshift.CAPS)
    assert len(raw) == 24 and struct.unpack("<IIIIII", raw) == (0x03000001, 1 << 13, 0, 0, 0, 5 * 65536)
    assert tool.stat().st_uid == 5 * 65536
