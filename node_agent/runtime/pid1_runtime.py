"""The tree pid1 runs from inside every container: this agent's Python interpreter, the shared libraries
it and its extension modules link, the stdlib modules pid1 imports and pid1 itself, copied (owned by
host root, so root inside a container maps to nobody who may write them) and bind-mounted read-only,
nosuid and nodev at ``/.execbroker``. The instance's own rootfs needs no Python: the ELF loader is named
explicitly, so neither does it need the host's ``/lib64``.

Built once per node into ``<data_dir>/pid1-runtime/<digest>`` (the digest covers the interpreter and
pid1's sources: a new build never changes a tree that running containers use).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MOUNT = "/.execbroker"  # where containers see the tree
PID1_PACKAGE = Path(__file__).resolve().parent / "pid1"
REPO_ROOT = PID1_PACKAGE.parents[2]  # what holds the node_agent package
_LDD_LINE = re.compile(r"(?:(\S+) => )?(/\S+) \(0x[0-9a-f]+\)")

# What pid1 imports, listed by the interpreter itself (run with pid1's own flags: no site).
_LIST_MODULES = """
import importlib.util, json, runpy, sys  # runpy: what `python -m` starts with (frozen only from 3.11)
sys.path.insert(0, sys.argv[1])
import node_agent.runtime.pid1.__main__, node_agent.runtime.pid1.launch, node_agent.runtime.pid1.server
files = set()
for mod in list(sys.modules.values()):
    path = getattr(mod, "__file__", None)
    if path and not path.startswith(sys.argv[1]):
        files.add(path)
        if path.endswith(".py"):
            cached = importlib.util.cache_from_source(path)
            files.add(cached)
print(json.dumps({"files": sorted(files), "stdlib": sys.base_prefix, "version": sys.version}))
"""


@dataclass(frozen=True)
class Pid1Runtime:
    host_path: Path  # the tree on the host
    loader: str  # inside the container: the ELF loader ...
    argv: tuple[str, ...]  # ... and what it runs (pid1's arguments follow)
    env: tuple[str, ...]

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]


def build(data_dir: Path, python: str = sys.executable) -> Pid1Runtime:
    """The runtime tree for ``python`` (built if missing)."""
    listed = json.loads(subprocess.run([python, "-s", "-S", "-c", _LIST_MODULES, str(REPO_ROOT)], check=True,
                                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}).stdout)
    prefix = Path(listed["stdlib"]).resolve()
    interpreter = Path(python).resolve()
    stdlib = [Path(f) for f in listed["files"] if Path(f).exists()]
    pid1_sources = sorted(PID1_PACKAGE.glob("*.py"))
    libs = _shared_libraries([interpreter, *(f for f in stdlib if f.suffix == ".so")])
    # everything copied counts: an upgraded libc or interpreter makes a new tree, never a changed one
    digest = _digest([interpreter, *pid1_sources, *stdlib, *sorted(libs.values())], listed["version"])
    root = data_dir / "pid1-runtime" / digest
    if not (root / ".complete").exists():
        _populate(root, interpreter, prefix, stdlib, pid1_sources, libs)
    return _describe(root)


def _digest(files: list[Path], version: str) -> str:
    h = hashlib.sha256(version.encode())
    for path in files:
        h.update(str(path).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _populate(root: Path, interpreter: Path, prefix: Path, stdlib: list[Path], pid1_sources: list[Path],
              libs: dict[str, Path]) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    try:
        (staging / "bin").mkdir()
        shutil.copy2(interpreter, staging / "bin" / "python")
        lib_dir = staging / "lib"
        lib_dir.mkdir()
        for name, lib in libs.items():
            shutil.copy2(lib, lib_dir / name)  # under the name the loader looks for (the soname)
        for path in stdlib:  # same layout below the prefix: PYTHONHOME finds them
            dest = staging / "python" / path.relative_to(prefix)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        app = staging / "app"
        for init in (REPO_ROOT / "node_agent" / "__init__.py", REPO_ROOT / "node_agent" / "runtime" / "__init__.py"):
            dest = app / init.relative_to(REPO_ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(init, dest)
        (app / "node_agent" / "runtime" / "pid1").mkdir()
        for src in pid1_sources:
            shutil.copy2(src, app / "node_agent" / "runtime" / "pid1" / src.name)
        for dirpath, dirnames, filenames in os.walk(staging):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), 0, 0)
        os.chmod(staging, 0o755)
        (staging / ".complete").touch()
        os.rename(staging, root)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (root / ".complete").exists():
            raise  # anything but "built meanwhile by another agent of this node"
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _shared_libraries(binaries: list[Path]) -> dict[str, Path]:
    """Every shared library (the loader included) the binaries need, as ldd resolves them: the name the
    loader asks for -> the file."""
    found: dict[str, Path] = {}
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            m = _LDD_LINE.search(line.strip())
            if m:
                path = Path(m.group(2))
                found[m.group(1) or path.name] = path.resolve()
    return found


def _describe(root: Path) -> Pid1Runtime:
    loader = next((p.name for p in (root / "lib").iterdir() if p.name.startswith("ld-linux")), None)
    if loader is None:
        raise RuntimeError(f"no ELF loader among the libraries of {root}")
    return Pid1Runtime(
        host_path=root,
        loader=f"{MOUNT}/lib/{loader}",
        argv=(f"{MOUNT}/lib/{loader}", "--library-path", f"{MOUNT}/lib", f"{MOUNT}/bin/python", "-s", "-S", "-B",
              f"{MOUNT}/app/node_agent/runtime/pid1"),
        env=(f"PYTHONHOME={MOUNT}/python", "PYTHONDONTWRITEBYTECODE=1"),
    )
