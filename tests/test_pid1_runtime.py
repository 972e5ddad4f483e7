"""The read-only tree pid1 runs from inside an instance (node_agent/runtime/pid1_runtime.py) holds every
module the interpreter needs to start it with `python -m`: runpy is frozen into 3.11+, not into 3.10,
whose pid1 died with "Could not import runpy module" (no Ray, no container)."""

from __future__ import annotations

from pathlib import Path

from node_agent.runtime.pid1_runtime import build


def test_the_tree_holds_what_python_m_needs(tmp_path: Path) -> None:
    runtime = build(tmp_path)
    assert list(runtime.host_path.rglob("runpy.py")), "runpy is missing from pid1's tree"
    assert list(runtime.host_path.rglob("__main__.py")), "pid1's own entry point is missing"
