"""Building the ``debian`` image: a minimal Debian 12 root filesystem with apt and python3, made by
``mmdebstrap`` from the Debian mirror this machine's apt is configured with (its sources for the
bookworm suites, written into the image as its own sources, so ``apt`` inside uses the same mirror).

Blocking: the image store runs ``build`` in a worker thread. Progress comes from mmdebstrap's own
``I: ...`` lines, passed on as they arrive.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

SUITE = "bookworm"
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
FALLBACK_SOURCES = (f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {SUITE} {SUITE}-updates\n"
                    "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
PACKAGES = ("apt", "python3", "ca-certificates")
# Documentation and translations are left out (as Debian's slim container images do), licences kept.
DPKG_OPTIONS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/locale/*",
                "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright")
BUILD_TIMEOUT = 1800.0
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class BuildError(Exception):
    """mmdebstrap is missing or failed; the message says why (its last lines)."""


def mmdebstrap() -> str | None:
    return shutil.which("mmdebstrap", path="/usr/bin:/bin:/usr/sbin:/sbin")


def host_sources(paths: tuple[Path, ...] = APT_SOURCES) -> str:
    """The host's apt entries for Debian 12's suites as deb822 stanzas; deb.debian.org if it has none."""
    stanzas: list[str] = []
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources")))
        elif path.is_file():
            files.append(path)
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        parsed = _deb822(text) if file.suffix == ".sources" else _one_line(text)
        stanzas.extend(s for s in parsed if s)
    return "\n".join(stanzas) if stanzas else FALLBACK_SOURCES


def _deb822(text: str) -> list[str]:
    """The stanzas of a .sources file that are enabled binary entries for Debian 12's suites."""
    found = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        suites = [s for s in fields.get("suites", "").split() if s in SUITES]
        if "deb" not in fields.get("types", "").split() or not suites or fields.get("enabled", "yes") == "no":
            continue
        lines = ["Types: deb", f"URIs: {fields.get('uris', '')}", f"Suites: {' '.join(suites)}",
                 f"Components: {fields.get('components', 'main')}"]
        if "signed-by" in fields:
            lines.append(f"Signed-By: {fields['signed-by']}")
        found.append("\n".join(lines) + "\n")
    return found


def _one_line(text: str) -> list[str]:
    """``deb URI SUITE COMPONENTS...`` lines for Debian 12's suites, as deb822 stanzas."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 4 or words[0] != "deb":
            continue
        options = ""
        if words[1].startswith("["):  # [signed-by=... arch=...]
            end = next((i for i, w in enumerate(words) if w.endswith("]")), None)
            if end is None:
                continue
            options, words = " ".join(words[1:end + 1])[1:-1], [words[0], *words[end + 1:]]
            if len(words) < 4:
                continue
        if words[2] not in SUITES:
            continue
        stanza = f"Types: deb\nURIs: {words[1]}\nSuites: {words[2]}\nComponents: {' '.join(words[3:])}\n"
        signed = [o.split("=", 1)[1] for o in options.split() if o.startswith("signed-by=")]
        if signed:
            stanza += f"Signed-By: {signed[0]}\n"
        found.append(stanza)
    return found


def mirrors(sources: str) -> list[str]:
    """The mirror URIs named in deb822 ``sources``."""
    return [uri for line in sources.splitlines() if line.startswith("URIs:") for uri in line.split()[1:]]


def build(dest: Path, sources: str, progress: Callable[[str], None]) -> None:
    """Build the rootfs into ``dest`` (must not exist); ``progress`` gets each stage as mmdebstrap reports it."""
    tool = mmdebstrap()
    if tool is None:
        raise BuildError("mmdebstrap is not installed (run deploy/system-deps.sh)")
    sources_file = dest.with_name(dest.name + ".sources")
    sources_file.write_text(sources)
    argv = [tool, "--variant=minbase", f"--include={','.join(PACKAGES)}", "--format=directory", "--mode=root",
            *(f"--dpkgopt={o}" for o in DPKG_OPTIONS), SUITE, str(dest), str(sources_file)]
    tail: list[str] = []
    try:
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, errors="replace", start_new_session=True) as proc:
            watchdog = threading.Timer(BUILD_TIMEOUT, proc.kill)
            watchdog.start()
            try:
                assert proc.stderr is not None
                for line in proc.stderr:
                    line = line.strip()
                    tail = [*tail[-9:], line]
                    if line.startswith("I: "):
                        progress(line[3:].rstrip("."))
                code = proc.wait()
            finally:
                watchdog.cancel()
    finally:
        sources_file.unlink(missing_ok=True)
    if code < 0:
        tail.append(f"killed after {BUILD_TIMEOUT:.0f} s")
    if code != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise BuildError("mmdebstrap failed: " + " | ".join(line for line in tail if line))
