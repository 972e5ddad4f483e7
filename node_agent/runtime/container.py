"""Starting and ending an instance as an unprivileged OCI container (the ``oci`` driver): the bundle
from the instance's definition (oci.py), pid1 from the read-only runtime tree (pid1_runtime.py), runc
to run it (runc.py). Blocking: the instance manager calls these in a worker thread.

The spawn socket is bound here, on the host (``<instance>/spawn.sock``, 0600, in a directory the
container cannot reach), and handed to pid1 as fd 3 with a readiness pipe as fd 4: nothing inside the
container can replace the socket the agent connects to.
"""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path

from node_agent.runtime import oci, pid1_runtime, records
from node_agent.runtime.idranges import Range
from node_agent.runtime.launcher import LaunchError, Pid1Identity, identify
from node_agent.runtime.limits import Limits
from node_agent.runtime.pid1.launch import read_until_eof
from node_agent.runtime.pid1_runtime import Pid1Runtime
from node_agent.runtime.rootfs import Bind
from node_agent.runtime.runc import Runc, RuncError

READY = b"ready"
READY_TIMEOUT = 30.0
SOCKET_NAME = "spawn.sock"


def allocate_id_base(used: set[int], ids: Range) -> int:
    """The lowest free instance range in the node's delegation: ranges never overlap, so root in one
    instance is nobody in another (or anywhere else on the host)."""
    for base in range(ids.start, ids.end - oci.ID_RANGE + 1, oci.ID_RANGE):
        if base not in used:
            return base
    raise LaunchError(f"No free id range for another instance on this node ({ids.count // oci.ID_RANGE} in use)")


class ContainerRuntime:
    def __init__(self, data_dir: Path, cgroup_parent: str) -> None:
        self.data_dir = data_dir
        self.cgroup_parent = cgroup_parent
        self.runc = Runc(data_dir / "runc")
        self._pid1: Pid1Runtime | None = None

    def pid1(self) -> Pid1Runtime:
        if self._pid1 is None:
            self._pid1 = pid1_runtime.build(self.data_dir)
        return self._pid1

    def cgroup_path(self, key: str) -> str:
        return f"/{self.cgroup_parent}/{key}"

    def start(self, key: str, instance_dir: Path, id_base: int, binds: list[Bind], config: dict[str, str]) -> Pid1Identity:
        """Run the instance's container; returns its pid1 once it serves."""
        runtime = self.pid1()
        hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        spec = oci.bundle(hostname=records.split_key(key)[1], id_base=id_base,
                          pid1_argv=runtime.command("container"),
                          # names pid1 on the host (leak checks); its environment is not readable inside
                          pid1_env=[*runtime.env, f"EXECBROKER_INSTANCE={instance_dir}"],
                          runtime_dir=str(runtime.host_path), binds=binds, limits=instance_limits(config),
                          cgroup_path=self.cgroup_path(key),
                          no_new_privs=config.get("security.no_new_privs", "false") == "true",
                          max_files=min(hard_files, 1 << 20) if hard_files > 0 else 65536)
        records.write_json(instance_dir / "config.json", spec)
        self.runc.delete(key, force=True)  # what an earlier run may have left in runc's state
        listener = _listen(instance_dir / SOCKET_NAME)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                pid = self.runc.run(key, instance_dir, listener.fileno(), ready_w, instance_dir / "pid1.log")
            except RuncError as exc:
                raise LaunchError(f"Failed to start instance: {exc}") from None
            finally:
                listener.close()  # pid1 has it now
                os.close(ready_w)
            report = read_until_eof(ready_r, READY_TIMEOUT)
        finally:
            os.close(ready_r)
        if report != READY:
            self.stop(key)
            raise LaunchError(f"Failed to start instance: {report.decode(errors='replace') or 'pid1 exited'}")
        ident = identify(pid)
        if ident is None:
            raise LaunchError("Failed to start instance: its pid1 exited at once")
        return ident

    def stop(self, key: str) -> None:
        """Forget the container (after pid1 ended; a live one is killed first)."""
        self.runc.delete(key, force=True)

    def update(self, key: str, config: dict[str, str]) -> None:
        """Apply the limits of ``config`` to the running container, live."""
        try:
            self.runc.update(key, instance_limits(config).runc_update_args())
        except RuncError as exc:
            raise LaunchError(f"Failed to apply the limits: {exc}") from None


def instance_limits(config: dict[str, str]) -> Limits:
    """The instance's limits, with an eighth of the host's pids (at least 256) where ``limits.processes``
    is unset: a fork bomb in one instance cannot take the host's last process slot."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
    except (OSError, ValueError):
        pid_max = 32768
    return Limits.from_config(config).with_default_processes(max(256, pid_max // 8))


def _listen(path: Path) -> socket.socket:
    """The spawn socket, bound by name through a directory fd (the path may not fit sun_path)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:  # bound with the process umask (no write bit for others: nobody else can connect), then 0600
        sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
        os.chmod(path.name, 0o600, dir_fd=dir_fd)
        sock.listen(socket.SOMAXCONN)  # a burst of execs queues here (the kernel caps it at somaxconn)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock

