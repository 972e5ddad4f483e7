"""The package layout's rules, checked on the source: imports point down the layers, pid1 stays
stdlib-only, and every file opens with a line saying what it holds."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import its own layer or lower ones.
LAYERS = ["core", "node_agent.runtime", "node_agent", "broker", "api", "client"]
# The Ray actor and its worker processes compose api + broker + node: the places that know all three.
COMPOSITION_ROOTS = {"node_agent.agent", "node_agent.worker"}
PID1 = "node_agent.runtime.pid1"


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in ("core", "node_agent", "broker", "api", "client"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, path))
    return found


def layer(module: str) -> int | None:
    best = None
    for rank, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = rank  # the longest prefix wins (node_agent.runtime before node_agent)
            if prefix == "node_agent.runtime":
                return rank
    return best


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


MODULES = modules()


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(name: str, path: Path) -> None:
    if name in COMPOSITION_ROOTS:
        return
    own = layer(name)
    assert own is not None
    upward = [m for m in imports(path) if (rank := layer(m)) is not None and rank > own]
    assert not upward, f"{name} (layer {LAYERS[own]}) imports a higher layer: {upward}"


@pytest.mark.parametrize(("name", "path"), [(m, p) for m, p in MODULES if m.startswith(PID1)],
                         ids=[m for m, _ in MODULES if m.startswith(PID1)])
def test_pid1_is_stdlib_only(name: str, path: Path) -> None:
    """pid1 runs with ``python -I -S`` and chroots: nothing but the stdlib and itself."""
    foreign = [m for m in imports(path) if m.split(".")[0] not in sys.stdlib_module_names
               and not m.startswith(PID1) and m.split(".")[0] != "__future__"]
    assert not foreign, f"{name} imports {foreign}"


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_every_file_says_what_it_holds(name: str, path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.splitlines()[0].strip(), f"{path.relative_to(ROOT)} has no opening docstring"
