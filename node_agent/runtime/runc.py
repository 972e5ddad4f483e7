"""runc, the OCI runtime instances run under (Debian's runc 1.1): start a bundle detached with pid1's
two file descriptors, and the container's later life (delete, update).
Blocking calls: the instance manager runs them in a worker thread. One runc state root per data dir,
so container ids only need to be unique per node: they are instance keys."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

from node_agent.runtime.oci import PID1_LISTEN_FD, PID1_READY_FD

TIMEOUT = 30.0


class RuncError(Exception):
    """runc refused or failed; the message is what it said."""


def binary() -> str | None:
    return shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin")


class Runc:
    def __init__(self, state_root: Path, path: str | None = None) -> None:
        self.state_root = state_root
        self.path = path or binary() or "runc"

    def _cmd(self, *args: str) -> list[str]:
        return [self.path, "--root", str(self.state_root), *args]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
        if check and done.returncode != 0:
            raise RuncError(_message(done.stderr) or f"runc {args[0]} exited {done.returncode}")
        return done

    def run(self, container_id: str, bundle: Path, listener: int, ready: int, log: Path) -> int:
        """Start the bundle detached, pid1 getting ``listener`` and ``ready`` as fds 3 and 4; returns
        the host pid of the container's process once runc is done (pid1 may still be starting)."""
        self.state_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        pid_file = bundle / "init.pid"
        pid_file.unlink(missing_ok=True)
        runc_log = bundle / "runc.log"  # runc's own messages; the container's stdout and stderr go to ``log``
        runc_log.unlink(missing_ok=True)
        argv = [*self._cmd("--log", str(runc_log), "--log-format", "json"), "run",
                "--detach", "--bundle", str(bundle), "--pid-file", str(pid_file),
                f"--preserve-fds={PID1_READY_FD - PID1_LISTEN_FD + 1}", container_id]
        # fds 3 and 4 exactly, without a preexec function in this threaded process: copies numbered
        # above them go to the child, where bash (dash knows fds up to 9 only) moves them into place
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (listener, ready)]
        try:
            script = (f'exec {PID1_LISTEN_FD}<&{high[0]} {PID1_READY_FD}>&{high[1]} {high[0]}<&- {high[1]}>&- "$@"')
            # detached, runc hands its stdio to the container: no pipes here, the log file
            with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab") as out:
                done = subprocess.run(["/bin/bash", "-c", script, "bash", *argv], check=False, stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=out, pass_fds=high, timeout=TIMEOUT,
                                      start_new_session=True)
        except subprocess.TimeoutExpired:
            self.delete(container_id, force=True)
            raise RuncError(f"runc run did not finish in {TIMEOUT:.0f}s") from None
        finally:
            for fd in high:
                os.close(fd)
        if done.returncode != 0:
            self.delete(container_id, force=True)
            raise RuncError(_logged_error(runc_log) or f"runc run exited {done.returncode}")
        return int(pid_file.read_text().strip())

    def delete(self, container_id: str, force: bool = False) -> None:
        self._run("delete", *(["--force"] if force else []), container_id, check=False)

    def update(self, container_id: str, args: list[str]) -> None:
        self._run("update", *args, container_id)



def _logged_error(path: Path) -> str:
    """The last error runc wrote to its JSON log."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") == "error":
            return str(entry.get("msg", ""))
    return ""


def _message(stderr: str) -> str:
    """runc's own error line (``level=error msg="..."``), else its last line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if 'msg="' in line:
            return line.split('msg="', 1)[1].rsplit('"', 1)[0].replace('\\"', '"')
    return lines[-1] if lines else ""
