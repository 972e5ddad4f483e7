"""2b. `lxc exec REMOTE:c1 -- true` over HTTPS with a client certificate, the real Debian `lxc` client.

The broker serves HTTPS on a loopback port for the run (`core.https_address`), and the bench's client is
trusted with a token (`lxc remote add`). Baseline, interleaved: real LXD over HTTPS the same way (its
`core.https_address` set for the run when it had none, the bench's certificate trusted with a token;
both undone afterwards). Each `lxc exec` opens seven TLS connections (DESIGN §3).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

from bench.context import Context
from bench.harness import Row, summary_ms, vs_lxd

NAME = "lxc_https"
TITLE = "2b `lxc exec` over HTTPS"
TARGET_RATIO = 0.5
LXD_ANCHOR_MS = 139.0  # DESIGN.md §3, used only when no LXD answers here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ok(r: subprocess.CompletedProcess[bytes], what: str) -> subprocess.CompletedProcess[bytes]:
    if r.returncode != 0:
        raise RuntimeError(f"{what}: {r.stderr.decode(errors='replace').strip()}")
    return r


def _trust(ctx: Context, remote: str, real_lxd: bool) -> str:
    """A token from the server (over its unix socket) and `lxc remote add` with it; returns the address."""
    current = _ok(ctx.lxc("config", "get", "core.https_address", real_lxd=real_lxd, stdout=subprocess.PIPE),
                  "config get").stdout.decode().strip()
    address = current or f"127.0.0.1:{_free_port()}"
    if not current:
        _ok(ctx.lxc("config", "set", "core.https_address", address, real_lxd=real_lxd), "config set")
    token = _ok(ctx.lxc("config", "trust", "add", "--name", f"bench-{remote}", real_lxd=real_lxd,
                        stdout=subprocess.PIPE), "trust add").stdout.decode().strip().splitlines()[-1]
    ctx.lxc("remote", "remove", remote)
    _ok(ctx.lxc("remote", "add", remote, token), f"remote add {remote}")
    return "" if current else address


def _untrust(ctx: Context, remote: str, real_lxd: bool, unset_address: bool) -> None:
    listed = ctx.lxc("config", "trust", "list", "--format", "json", real_lxd=real_lxd, stdout=subprocess.PIPE)
    for cert in json.loads(listed.stdout or b"[]"):
        if cert.get("name") == f"bench-{remote}":
            ctx.lxc("config", "trust", "remove", cert["fingerprint"], real_lxd=real_lxd)
    ctx.lxc("remote", "remove", remote)
    if unset_address:
        ctx.lxc("config", "unset", "core.https_address", real_lxd=real_lxd)


def _timed(ctx: Context, remote: str) -> float:
    t0 = time.perf_counter()
    _ok(ctx.lxc("exec", f"{remote}:c1", "--", "true", timeout=60), f"lxc exec {remote}:c1")
    return time.perf_counter() - t0


async def run(ctx: Context) -> list[Row]:
    n = ctx.n(10, 30)
    lxd = ctx.check_lxd()
    ours_set = _trust(ctx, "eb", real_lxd=False)
    lxd_set = _trust(ctx, "lxd", real_lxd=True) if lxd else ""
    try:
        for _ in range(3):
            _timed(ctx, "eb")
            if lxd:
                _timed(ctx, "lxd")
        ours, theirs = [], []
        for _ in range(n):
            ours.append(_timed(ctx, "eb"))
            if lxd:
                theirs.append(_timed(ctx, "lxd"))
    finally:
        _untrust(ctx, "eb", False, bool(ours_set))
        if lxd:
            _untrust(ctx, "lxd", True, bool(lxd_set))
    s = summary_ms(ours)
    return [vs_lxd(TITLE, s, theirs if lxd else None, "real LXD over HTTPS", TARGET_RATIO, LXD_ANCHOR_MS,
                   ctx.lxd_why, n)]
