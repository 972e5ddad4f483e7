"""PID 1 of one execbroker instance: init, zombie reaper and spawner in one single-threaded process.

Stdlib-only on purpose: it runs as ``python -I -S node_agent/runtime/pid1 launch CONFIG.json`` (this
directory's ``__main__``) and, once it has chrooted into a busybox rootfs, can import nothing more, so every
module it uses is imported when it starts. The agent talks to it with ``node_agent/runtime/spawn.py``;
``node_agent/runtime/launcher.py`` starts it.

Modules: ``syscalls`` (libc calls, signal resets, /proc parsing), ``launch`` (the launcher), ``mounts`` (the
instance's filesystems), ``server`` (pid1's loop: connections, spawns, reaping), ``spawner`` (how one
command starts).

Two processes take part in a start:

* the **launcher** (started by the agent in a new session): joins the instance's freezer cgroup, unshares the
  pid/mount/uts/ipc namespaces, forks pid1, waits for pid1's readiness on a pipe, prints one JSON line
  (``{"pid": N, "start_time": T}`` or ``{"error": "..."}``) and exits, so pid1 is reparented away from the
  agent (it survives the agent and its Ray cluster);
* **pid1**: PID 1 of the new pid namespace. It mounts the instance's filesystems, binds ``spawn.sock`` (a
  host path), chroots, reports readiness and then serves spawn requests until SIGTERM.

Spawn protocol (SOCK_SEQPACKET, one connection per command, one JSON object per message):

* agent -> pid1: ``{"argv", "env", "cwd", "uid", "gid", "pty"}`` carrying fds [stdin, stdout, stderr];
* pid1 -> agent: ``{"pid": P}`` (P in the instance's pid namespace) with a pidfd on the command once exec
  succeeded, or ``{"error": "..."}`` (then closes);
* pid1 -> agent: ``{"exit": <raw wait status>}`` when the command was reaped (then closes);
* agent -> pid1 at any time: ``{"signal": N}`` (main process) or ``{"kill": true}`` (its process group).
  The agent closing the connection while the command runs SIGKILLs the command's process group.

The ``process`` isolation mode runs this same program without namespaces or chroot (development only).
"""
