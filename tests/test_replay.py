"""The replay buffer of detachable execs: offsets, the bound, what a late reader is told."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import BadRequest
from core.replay import Gone, ReplayBuffer, capacity_of


def test_offsets_and_overflow() -> None:
    buf = ReplayBuffer(10)
    buf.append(b"hello ")
    buf.append(b"world")
    assert (buf.produced, buf.earliest) == (11, 1)
    assert buf.read(1, 100) == b"ello world" and buf.read(6, 3) == b"wor" and buf.read(11, 5) == b""
    with pytest.raises(Gone) as err:
        buf.read(0, 5)
    assert err.value.earliest == 1
    assert err.value.message == "Output before offset 1 is no longer held (asked for 0)"
    with pytest.raises(BadRequest):
        buf.check(12)


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(1, 1000))
def test_the_buffer_is_the_tail_of_the_stream(chunks: list[bytes], capacity: int) -> None:
    buf = ReplayBuffer(capacity)
    for chunk in chunks:
        buf.append(chunk)
    stream = b"".join(chunks)
    assert buf.produced == len(stream) and buf.earliest == max(0, len(stream) - capacity)
    assert buf.read(buf.earliest, 1 << 20) == stream[buf.earliest:]
    for offset in range(buf.earliest, buf.produced + 1, 7):
        assert buf.read(offset, 13) == stream[offset:offset + 13]


def test_capacity_bounds() -> None:
    assert capacity_of(None) == 8 << 20
    for bad in (0, 1000, 1 << 30):
        with pytest.raises(BadRequest):
            capacity_of(bad)
