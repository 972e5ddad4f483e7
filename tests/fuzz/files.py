"""The files target: ``GET/HEAD/POST/DELETE /1.0/instances/{name}/files?path=`` with any path, query,
headers and body, on two scratch instances (one running: pid1 does the lookups; one stopped: the agent
does them on its rootfs), seeded with files, symlinks out of the instance, loops, a link to a device."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from core.filespec import parse_push
from tests.fuzz.props import Fuzz
from tests.fuzz.values import TEXT, dumps, pattern, quoted, weighted

COMPONENTS = st.one_of(st.sampled_from(["fz", "f", "dir", "link", "loop", "up", "procy", "devz", "new", "..", ".", "",
                                        "tmp", "proc", "self", "dev", "zero", "etc", "passwd", "fd", "0"]),
                       st.text(min_size=1, max_size=10))
PATHS = weighted(
    (2, st.lists(COMPONENTS, max_size=5).map(lambda cs: "/tmp/fz/" + "/".join(cs))),
    (1, st.lists(COMPONENTS, max_size=6).map("/".join)),
    (1, TEXT),
    (1, st.sampled_from(["/", "//", "/proc/self/environ", "/proc/1/root/etc/passwd", "/proc/self/fd/0", "/dev/zero",
                         "/dev/null", "/dev/ptmx", "/sys/kernel", "/etc/passwd", "/tmp/fz/link", "/tmp/fz/dir/",
                         "/tmp/fz/f/", "/tmp/fz/f/x", "/tmp/fz/loop/x", "/tmp/fz/up/etc/passwd", "/tmp/fz/procy",
                         "/tmp/fz/devz", "a" * 5000, "/" + "a" * 300, "/tmp/" + "d/" * 100])),
)
SEED = [("directory", "/tmp/fz", b""), ("file", "/tmp/fz/f", b"seed\n"), ("directory", "/tmp/fz/dir", b""),
        ("symlink", "/tmp/fz/link", b"f"), ("symlink", "/tmp/fz/loop", b"loop"), ("symlink", "/tmp/fz/up", b"../../.."),
        ("symlink", "/tmp/fz/procy", b"/proc/self/environ"), ("symlink", "/tmp/fz/devz", b"/dev/zero")]
# what a client can send in a header value: printable ASCII, no space at either end
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(str.strip)
IDS = ["0", "-1", "1000", "65535", "65536", "4294967295", "4294967296", "-2", "+7", "1.0", "0x10", ""]
MODES = ["0644", "644", "0755", "7777", "10000", "-1", "0o644", "999", "0x1ff", ""]
TYPES = ["file", "directory", "symlink"]
WRITES = ["overwrite", "append"]


def _value(good: list[str]) -> st.SearchStrategy[str]:
    return weighted((2, st.sampled_from(good)), (1, HEADER_TEXT))


GOOD_HEADERS = st.fixed_dictionaries({}, optional={
    "X-LXD-type": st.sampled_from(TYPES), "X-LXD-write": st.sampled_from(WRITES),
    "X-LXD-uid": st.sampled_from(["0", "1000", "65535"]), "X-LXD-gid": st.sampled_from(["0", "1000", "65535"]),
    "X-LXD-mode": st.sampled_from(["0644", "644", "0755", "0600", "7777"]),
})
ANY_HEADERS = st.fixed_dictionaries({}, optional={
    "X-LXD-type": _value(TYPES), "X-Incus-type": _value(TYPES), "X-LXD-write": _value(WRITES),
    "X-Incus-write": _value(WRITES), "X-LXD-uid": _value(IDS), "X-LXD-gid": _value(IDS), "X-LXD-mode": _value(MODES),
    "X-Incus-uid": _value(IDS), "X-Incus-mode": _value(MODES),
})


@dataclass(frozen=True)
class FileCase:
    stopped: bool
    method: str
    path: str
    query: str  # "path": ?path=<path>; "none": no path; "twice": two of them; else a raw query string
    headers: dict[str, str]
    body: bytes | int  # an int: that many pattern bytes


FILE_CASES = st.builds(
    FileCase, st.booleans(), st.sampled_from(["GET", "GET", "HEAD", "POST", "POST", "POST", "DELETE", "PUT"]), PATHS,
    weighted((3, st.just("path")), (1, st.sampled_from(["none", "twice", "path=%ZZ", "path=%00", "path=%ff%fe",
                                                        "path=", "path", "path=/&path"]))),
    weighted((2, GOOD_HEADERS), (1, ANY_HEADERS)),
    st.one_of(st.binary(max_size=300), PATHS.map(lambda p: p.encode("utf-8", "surrogatepass")),
              st.integers(0, 2 << 20)),
)


def _url(name: str, case: FileCase) -> str:
    path = quoted(case.path)
    query = {"path": f"path={path}", "none": "", "twice": f"path={path}&path=/tmp"}.get(case.query, case.query)
    return f"/1.0/instances/{name}/files" + (f"?{query}" if query else "")


async def files(fz: Fuzz, case: FileCase) -> None:
    """Any request: an envelope or a file's bytes (bounded); what a push wrote to a file reads back."""
    body = pattern(case.body) if isinstance(case.body, int) else case.body
    url = _url(fz.stopped if case.stopped else fz.running, case)
    r, _ = await fz.call(case.method, url, body if case.method == "POST" else None, headers=case.headers)
    if case.method == "POST" and r.status == 200:
        spec = parse_push({k.lower(): v for k, v in case.headers.items()})
        if spec.type == "file" and spec.write == "overwrite":
            back, _ = await fz.call("GET", url)
            if back.status == 200 and back.headers.get("x-lxd-type") == "file":  # (not a symlink's answer)
                assert back.body == body, f"pushed {len(body)} bytes, read back {len(back.body)}"


async def prepare(fz: Fuzz) -> None:
    """The scratch instances, with the files, links and loops of SEED."""
    for name, start in ((fz.running, True), (fz.stopped, False)):
        r, _ = await fz.call("GET", f"/1.0/instances/{name}")
        if r.status == 404:
            _, doc = await fz.call("POST", "/1.0/instances", dumps(
                {"name": name, "source": {"type": "image", "alias": "busybox"}, "start": start}))
            assert doc is not None and doc["type"] == "async", doc
            final = await fz.finish(doc["metadata"])
            assert final["status"] == "Success", final
        for kind, path, content in SEED:
            await fz.call("POST", f"/1.0/instances/{name}/files?path={quoted(path)}", content,
                          headers={"X-LXD-type": kind})


async def remove(fz: Fuzz) -> None:
    """The scratch instances stopped and deleted."""
    for name in (fz.running, fz.stopped):
        _, doc = await fz.call("PUT", f"/1.0/instances/{name}/state", dumps({"action": "stop", "force": True}))
        if doc is not None and doc["type"] == "async":
            await fz.finish(doc["metadata"])
        _, doc = await fz.call("DELETE", f"/1.0/instances/{name}")
        if doc is not None and doc["type"] == "async":
            await fz.finish(doc["metadata"])
