"""PID 1 of one execbroker instance: init, zombie reaper and spawner in one single-threaded process.

Stdlib-only on purpose: inside a container it runs from the read-only tree ``pid1_runtime`` builds (the
agent's interpreter with only the stdlib files pid1 imports), as ``python -s -S -B <this directory>
container LABEL``; every module it uses is imported when it starts. The agent talks to it with
``node_agent/runtime/spawn.py``; ``node_agent/runtime/container.py`` starts it through runc.

Modules: ``launch`` (how pid1 comes to life: in a container, or by the process driver's launcher),
``server`` (pid1's loop: connections, spawns, reaping), ``spawner`` (how one command starts, PTYs),
``files`` (the file service: lookups, creations, removals inside the instance),
``reclaim`` (what happens at the process limit), ``syscalls`` (libc calls, signal resets, /proc parsing).

In a container, runc has made the namespaces, mounts and root; pid1 gets its listening socket (bound by
the agent on the host) as fd 3 and a readiness pipe as fd 4, reports ``ready`` on the pipe and serves spawn
requests until SIGTERM. With the ``process`` driver (development only, no isolation) a launcher forks
pid1 on the host, which binds the socket itself.

Spawn protocol (SOCK_SEQPACKET, one connection per command, one JSON object per message):

* agent -> pid1: ``{"argv", "env", "cwd", "uid", "gid", "pty", "width", "height"}`` carrying fds
  [stdin, stdout, stderr], or none with ``pty`` (pid1 opens the terminal inside);
* pid1 -> agent: ``{"pid": P, "fds": ["pidfd", "pty"]}`` (P in the instance's pid namespace) with a pidfd
  on the command and the PTY master, named in that order, once exec succeeded, or ``{"error": "..."}``
  (then closes);
* pid1 -> agent: ``{"exit": <raw wait status>}`` when the command was reaped (then closes);
* agent -> pid1 at any time: ``{"signal": N}`` (main process; with ``"group": true`` its process group)
  or ``{"kill": true}`` (SIGKILL to its process group).
  The agent closing the connection while the command runs SIGKILLs the command's process group.

A connection may instead carry one file request, ``{"file": OP, "path": ...}`` (``files.py``), answered
once (with the opened file as an fd for ``open`` and ``write``), then closed.

"""
