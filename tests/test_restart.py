"""What a broker keeps across its own restart (here the only member, so the head): the trust store,
projects, pending tokens, the server config and the HTTPS listener; and its running instances."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import Broker, restart_broker
from tests.remotes import Remote, enable_https, issue_token

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(shutil.which("lxc") is None, reason="lxd-client not installed (make test installs it)")]


def test_trust_projects_and_config_survive_a_restart(broker: Broker, c1: str) -> None:
    https = enable_https(broker)
    client, late = Remote(), Remote()
    try:
        assert client.add("eb", issue_token(broker, "kept")).returncode == 0
        pending = issue_token(broker, "pending")
        assert broker.lxc("project", "create", "kept").returncode == 0
        assert broker.lxc("config", "set", "core.remote_token_expiry", "2d").returncode == 0
        pid1 = broker.api("GET", f"/1.0/instances/{c1}/state")["metadata"]["pid"]

        restart_broker(broker)

        assert broker.lxc("config", "get", "core.https_address").stdout.decode().strip() == https
        assert broker.lxc("config", "get", "core.remote_token_expiry").stdout.decode().strip() == "2d"
        assert "kept" in broker.lxc("project", "list", "--format", "csv").stdout.decode()
        assert broker.api("GET", f"/1.0/instances/{c1}/state")["metadata"]["pid"] == pid1  # re-adopted
        r = client.lxc("exec", f"eb:{c1}", "--", "echo", "still trusted")
        assert (r.returncode, r.stdout) == (0, b"still trusted\n"), r.stderr
        assert late.add("eb", pending).returncode == 0  # a token issued before the restart still works
    finally:
        for remote in (client, late):
            broker.lxc("config", "trust", "remove", remote.fingerprint())
            remote.remove()
        broker.lxc("project", "delete", "kept")
        broker.lxc("config", "unset", "core.remote_token_expiry")
        broker.lxc("config", "unset", "core.https_address")
