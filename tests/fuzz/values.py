"""Values every target draws from: text (with NUL, lone surrogates, long strings), integers at and past
the bounds that matter (16, 32, 64 bits), floats with NaN and the infinities, any JSON."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each ``n`` times as likely as a weight of 1."""
    return st.one_of(*(strategy for n, strategy in choices for _ in range(n)))


SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80"])  # escaped in JSON; invalid as UTF-8
PLAIN = st.text(max_size=24)
TEXT = weighted((4, PLAIN), (1, SURROGATES),
                (1, st.sampled_from(["", " ", "\x00", "a\x00b", "..", "/", "=", "A=B", "\u202e", "é", "x" * 300])))
INTS = st.one_of(st.integers(-3, 70000), st.integers(),
                 st.sampled_from([2**16 - 1, 2**16, 2**31, 2**32 - 1, 2**32, 2**63, -(2**63), 2**64, 10**400]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)


def either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right kind, sometimes any JSON."""
    return weighted((4, good), (1, JSON))


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """JSON as a client may send it: NaN and Infinity allowed; not ASCII-only, a lone surrogate is
    invalid UTF-8 on the wire."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def nested(n: int, inner: str = "") -> str:
    """JSON arrays ``n`` deep (past any parser's recursion limit for large ``n``)."""
    return "[" * n + inner + "]" * n


def pattern(n: int) -> bytes:
    """``n`` recognizable bytes (a large payload in a small example)."""
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


def quoted(value: str) -> str:
    """``value`` percent-encoded as one path segment or query value (a lone surrogate as its bytes)."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")
