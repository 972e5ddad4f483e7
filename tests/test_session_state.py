"""The IO-free session core: claims before upgrade, readiness, disconnect policy."""

from __future__ import annotations

import pytest

from core.errors import ApiError, Forbidden
from core.session_state import Phase, SessionState


def test_claims_and_readiness_non_interactive() -> None:
    st = SessionState(interactive=False)
    for fd in ("0", "1"):
        assert st.claim(st.secrets[fd]) == fd
    assert not st.ready
    st.claim(st.secrets["2"])
    assert st.ready  # control is optional when non-interactive


def test_interactive_needs_control() -> None:
    st = SessionState(interactive=True)
    st.claim(st.secrets["0"])
    assert not st.ready
    st.claim(st.secrets["control"])
    assert st.ready


def test_rejections() -> None:
    st = SessionState(interactive=False)
    with pytest.raises(ApiError, match="missing secret"):
        st.claim("")
    with pytest.raises(Forbidden):
        st.claim("0" * 64)
    st.claim(st.secrets["0"])
    with pytest.raises(ApiError, match="already connected") as exc:
        st.claim(st.secrets["0"])
    assert exc.value.status == 409
    st.release("0")
    assert st.claim(st.secrets["0"]) == "0"


def test_disconnect_policy() -> None:
    st = SessionState(interactive=False)
    assert not st.stdout_activity_kills()  # not running yet
    st.phase = Phase.RUNNING
    assert st.stdout_activity_kills() and st.control_lost_kills()
    st.claim(st.secrets["control"])
    assert not st.stdout_activity_kills()  # the control handler owns that decision
    st.phase = Phase.EXITED
    assert not st.control_lost_kills()
