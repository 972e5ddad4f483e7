"""The agent side of the spawn protocol treats pid1's answers as untrusted input (pid1 runs as the
instance's root): whatever comes back, every fd that came with it is returned or closed."""

from __future__ import annotations

import json
import os

import pytest

from core.errors import SpawnError
from node_agent.runtime.spawn import Pid1Unavailable, take_reply


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def pipes(n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


BAD = [
    (b"", 2, False),
    (b"not json", 1, False),
    (b"[1, 2]", 2, True),
    (json.dumps({"error": "refused"}).encode(), 2, True),
    (json.dumps({"pid": 5, "fds": "pidfd"}).encode(), 1, False),
    (json.dumps({"pid": 5, "fds": ["pty", "pty"]}).encode(), 2, True),
    (json.dumps({"pid": 5, "fds": ["pidfd", "secret"]}).encode(), 2, True),
    (json.dumps({"pid": 5, "fds": ["pidfd", "pty"]}).encode(), 2, False),  # a terminal nobody asked for
    (json.dumps({"pid": 5, "fds": ["pidfd"]}).encode(), 2, False),  # more fds than names
    (json.dumps({"pid": "5", "fds": ["pidfd"]}).encode(), 1, False),
    (json.dumps({"pid": True, "fds": []}).encode(), 0, False),
    (json.dumps({"pid": -1, "fds": []}).encode(), 0, False),
    (json.dumps({"pid": 5, "fds": ["pidfd"]}).encode(), 1, True),  # no terminal though one was asked for
]


@pytest.mark.parametrize("reply, nfds, want_pty", BAD)
def test_bad_answers_are_refused_and_close_their_fds(reply: bytes, nfds: int, want_pty: bool) -> None:
    before = fd_count()
    with pytest.raises((SpawnError, Pid1Unavailable)):
        take_reply(reply, pipes(nfds), want_pty)
    assert fd_count() == before


def test_a_good_answer_hands_over_its_fds() -> None:
    got = pipes(2)
    assert take_reply(json.dumps({"pid": 7, "fds": ["pidfd", "pty"]}).encode(), got, True) == (7, got[0], got[1])
    for fd in got:
        os.close(fd)
    assert take_reply(json.dumps({"pid": 7, "fds": []}).encode(), [], False) == (7, None, None)


def test_a_long_refusal_is_cut() -> None:
    with pytest.raises(SpawnError) as err:
        take_reply(json.dumps({"error": "x" * 100_000}).encode(), [], False)
    assert len(str(err.value)) <= 2000
