"""The front end's cache of remote operations: bounded in entries and in bytes, large ones trimmed to what
the cache is read for (no Ray)."""

from __future__ import annotations

import pytest

from broker.remote_ops import ENTRY_BYTES, RemoteOps, size_of, trim
from core.errors import ApiError
from core.identity import Identity

WHO = Identity("alice", "unix")
FDS = {"0": "s0" * 32, "1": "s1" * 32, "2": "s2" * 32, "control": "sc" * 32}


def op(op_id: str, status_code: int = 103, **metadata: object) -> dict[str, object]:
    return {"id": op_id, "class": "websocket", "description": "Executing command",
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
            "status": "Running" if status_code == 103 else "Success", "status_code": status_code,
            "resources": {"instances": ["/1.0/instances/c1"]}, "metadata": {"fds": FDS, **metadata},
            "may_cancel": True, "err": "", "location": "m2"}


def test_bytes_are_the_sum_of_the_entries_json() -> None:
    cache = RemoteOps()
    a, b = op("a"), op("b", env="x" * 500)
    cache.remember(a, "m2", "default")
    cache.remember(b, "m2", "p1")
    assert cache.bytes == size_of(a) + size_of(b)
    cache.remember(op("a", 200), "m2", "default")  # a new state replaces the old one's bytes
    assert cache.bytes == size_of(op("a", 200)) + size_of(b)
    assert (cache.owner_of("b"), cache.project_of("b"), cache.project_of("zz", "dflt")) == ("m2", "p1", "dflt")


def test_oldest_go_first_when_over_the_byte_budget() -> None:
    one = size_of(op("op-00", pad="x" * 1000))
    cache = RemoteOps(max_bytes=one * 5 + one // 2)
    for i in range(12):
        cache.remember(op(f"op-{i:02}", pad="x" * 1000), "m2", "default")
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 5
    assert [cache.owner_of(f"op-{i:02}") for i in range(12)] == [None] * 7 + ["m2"] * 5
    assert cache.running_on("m2") == [f"op-{i:02}" for i in range(7, 12)]


def test_entry_count_bound_too() -> None:
    cache = RemoteOps(limit=3)
    for i in range(5):
        cache.remember(op(str(i)), "m2", "default")
    assert len(cache) == 3 and cache.owner_of("0") is None and cache.owner_of("4") == "m2"


def test_a_large_operation_is_stored_trimmed_with_what_the_cache_needs() -> None:
    huge = op("big", detachable=True, results={f"c{i}": {"stdout": "y" * 10_000} for i in range(50)},
              summary={"total": 50, "done": 3}, **{"return": 0})
    huge["err"] = "e" * 100_000
    assert size_of(huge) > 500_000
    stored, size = trim(huge)
    assert size == size_of(stored) <= ENTRY_BYTES
    for key in ("id", "class", "status", "status_code", "location", "may_cancel", "created_at"):
        assert stored[key] == huge[key]
    assert stored["metadata"] == {"fds": FDS, "detachable": True, "summary": {"total": 50, "done": 3}, "return": 0}
    assert stored["resources"] == huge["resources"] and len(stored["err"]) == 1024

    cache = RemoteOps()
    cache.remember(huge, "m2", "default")
    assert cache.bytes == size <= ENTRY_BYTES
    assert cache.last("big") == stored
    lost = cache.lost("big", "m2")
    assert lost is not None and lost["status"] == "Failure" and lost["metadata"]["fds"] == FDS
    assert cache.bytes == size_of(lost)


def test_a_small_operation_is_stored_as_is() -> None:
    small = op("s")
    assert trim(small) == (small, size_of(small))


def test_precheck_relay_works_on_a_trimmed_entry() -> None:
    cache = RemoteOps()
    cache.remember(op("w", blob="z" * (ENTRY_BYTES * 4)), "m2", "default")
    cache.forwarded_websocket("w", WHO)
    assert cache.precheck_relay("w", FDS["1"], WHO) is True
    with pytest.raises(ApiError, match="already connected"):
        cache.precheck_relay("w", FDS["1"], WHO)
    with pytest.raises(ApiError, match="Forbidden"):
        cache.precheck_relay("w", "nope", WHO)


def test_an_evicted_operation_leaves_the_relay_check_to_the_owner() -> None:
    cache = RemoteOps(max_bytes=size_of(op("w")) + 10)
    cache.remember(op("w"), "m2", "default")
    cache.forwarded_websocket("w", WHO)
    cache.remember(op("v"), "m2", "default")  # pushes "w" out
    assert cache.owner_of("w") is None
    assert cache.precheck_relay("w", FDS["1"], WHO) is False  # dial the owner first


def test_lost_keeps_the_byte_count_true() -> None:
    cache = RemoteOps()
    cache.remember(op("r"), "m2", "default")
    cache.remember(op("done", 200), "m2", "default")
    lost = cache.lost("r", "m2")
    assert lost is not None and lost["err"] == "Cluster member m2 was lost"
    assert cache.bytes == size_of(lost) + size_of(op("done", 200))
    assert cache.running_on("m2") == []
    assert cache.lost("done", "m2") == op("done", 200)  # a finished one is shown as it ended


def test_lost_with_the_reason_given() -> None:
    cache = RemoteOps()
    cache.remember(op("r"), "m2", "default")
    lost = cache.lost("r", "m2", "The agent of cluster member m2 stopped")
    assert lost is not None and (lost["status"], lost["err"]) == ("Failure", "The agent of cluster member m2 stopped")


def test_finished_operations_go_after_their_time_running_ones_stay() -> None:
    now = [100.0]
    cache = RemoteOps(finished_for=10.0, clock=lambda: now[0])
    cache.remember(op("run"), "m2", "default")
    cache.remember(op("done", 200), "m2", "default")
    cache.forwarded_websocket("done", WHO)
    now[0] = 109.0
    cache.remember(op("later", 200), "m2", "default")
    assert cache.last("done") is not None  # still within its 10 s
    now[0] = 110.5
    cache.remember(op("run2"), "m2", "default")  # any change expires what is due
    assert cache.last("done") is None and cache.last("later") is not None and cache.last("run") is not None
    assert cache.bytes == sum(size_of(op(i, c)) for i, c in (("run", 103), ("later", 200), ("run2", 103)))
    assert not cache.precheck_relay("done", FDS["0"], WHO)  # its relay record went with it
    lost = cache.lost("run", "m2")  # a lost member's operation is finished from now on: its clock starts
    assert lost is not None and lost["status"] == "Failure"
    now[0] = 121.0
    cache.remember(op("x"), "m2", "default")
    assert cache.last("run") is None and cache.last("later") is None


def test_a_late_running_reply_never_undoes_a_final_event() -> None:
    cache = RemoteOps()
    cache.remember(op("fast", 200), "m2", "default")  # the Success event came first
    cache.remember(op("fast"), "m2", "default")  # then the forward's 202 with the running state
    assert cache.last("fast") == op("fast", 200) and cache.running_on("m2") == []
