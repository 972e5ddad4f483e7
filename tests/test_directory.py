"""The directory's pure logic: name claims, re-registration, restart from a saved member table."""

from __future__ import annotations

import pytest

from broker.directory import DirectoryState
from core.errors import Conflict


def test_claim_is_exclusive_and_release_frees() -> None:
    d = DirectoryState()
    d.register_member("a", "n1", "h:1", [])
    d.register_member("b", "n2", "h:2", [])
    d.claim_instance("c1", "a")
    with pytest.raises(Conflict):
        d.claim_instance("c1", "b")
    with pytest.raises(Conflict):
        d.claim_instance("c1", "a")
    d.release_instance("c1", "b")  # not the owner: nothing happens
    assert d.locate_instance("c1") == "a"
    d.release_instance("c1", "a")
    assert d.locate_instance("c1") is None


def test_reregistration_replaces_a_members_instances_and_reports_clashes() -> None:
    d = DirectoryState()
    d.register_member("a", "n1", "h:1", ["x", "y"])
    assert d.register_member("b", "n2", "h:2", ["y", "z"]) == ["y"]
    d.register_member("a", "n3", "h:3", ["x"])  # a came back as a new Ray node, without y
    assert d.locate_instance("y") is None and d.locate_instance("x") == "a"
    assert d.members["a"].node_id == "n3"


def test_restart_from_saved_table_keeps_lost_members() -> None:
    d = DirectoryState()
    d.register_member("a", "n1", "h:1", ["x"])
    d.register_member("b", "n2", "h:2", ["y"])
    fresh = DirectoryState()
    fresh.load_members(d.member_table())
    assert fresh.epoch != d.epoch
    assert fresh.locate_instance("y") == "b" and fresh.member_table() == d.member_table()
