"""``execbroker`` command line: start a node, manage instances, exec into them (lxc/incus compatible UX)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from client import fanout, terminal
from client.api import Client, ClientError, default_socket_path
from client.attach import cmd_attach


class UsageError(Exception):
    pass


def _instance(name: str) -> str:
    return "/1.0/instances/" + quote(name, safe="")


# ---- instance management -----------------------------------------------------------------------------------


async def cmd_launch(c: Client, args: argparse.Namespace) -> int:
    body = {"name": args.name, "source": {"type": "image", "alias": args.image}, "config": {}}
    path = "/1.0/instances" + (f"?target={quote(args.target, safe='')}" if args.target else "")
    await c.finish(await c.post(path, body))
    # Like `lxc launch`: a server that creates instances stopped (LXD) gets a start request.
    if (await c.get(_instance(args.name))).get("status") == "Stopped":
        await _state(c, args.name, "start")
    return 0


async def cmd_list(c: Client, args: argparse.Namespace) -> int:
    rows = [("NAME", "STATUS", "LOCATION")]
    for inst in await c.get("/1.0/instances", recursion="1"):
        rows.append((inst.get("name", ""), inst.get("status", ""), inst.get("location") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, status, location in rows:
        print(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {location}")
    return 0


async def _state(c: Client, name: str, action: str, force: bool = False) -> None:
    body = {"action": action, "timeout": 30, "force": force}
    await c.finish(await c.put(_instance(name) + "/state", body))


async def cmd_state(c: Client, args: argparse.Namespace) -> int:
    await _state(c, args.name, args.cmd, getattr(args, "force", False))
    return 0


async def cmd_delete(c: Client, args: argparse.Namespace) -> int:
    if args.force and (await c.get(_instance(args.name))).get("status") != "Stopped":
        await _state(c, args.name, "stop", force=True)
    await c.finish(await c.delete(_instance(args.name)))
    return 0


# ---- exec --------------------------------------------------------------------------------------------------


def _env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    if "TERM" in os.environ:  # the server never defaults TERM: send the caller's, like lxc
        env["TERM"] = os.environ["TERM"]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"Bad key=value pair: {pair}")
        env[key] = value
    return env


async def cmd_fanout(c: Client, args: argparse.Namespace) -> int:
    try:
        chosen = fanout.selector(args.all, args.select)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    body: dict[str, Any] = {"command": args.command, "selector": chosen, "concurrency": args.concurrency,
                            "environment": _env(args.env), "cwd": args.cwd or "", "user": args.user,
                            "group": args.group}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    return await fanout.run(c, body)


async def cmd_exec(c: Client, args: argparse.Namespace) -> int:
    if args.all or args.select:  # every instance I can see, or those whose config matches
        if args.name:
            args.command.insert(0, args.name)
        if not args.command:
            raise UsageError("exec: a command is required")
        return await cmd_fanout(c, args)
    if not args.name:
        raise UsageError("exec: an instance name is required (or --all / --select KEY=VALUE)")
    if not args.command:
        raise UsageError("exec: a command is required")
    if args.force_interactive and args.force_noninteractive:
        raise UsageError("You can't pass -t and -T at the same time")
    stdin_tty, stdout_tty = os.isatty(0), os.isatty(1)
    interactive = not args.force_noninteractive and not args.disable_stdin and (
        args.force_interactive or (stdin_tty and stdout_tty))
    width, height = terminal.terminal_size(1) if stdout_tty else (0, 0)
    if args.detach:  # extension exec_detach: started, not joined; `execbroker attach <id>` joins it
        body: dict[str, Any] = {"command": args.command, "wait-for-websocket": True, "interactive": interactive,
                                "environment": _env(args.env), "width": width, "height": height,
                                "cwd": args.cwd or "", "user": args.user, "group": args.group, "detachable": True}
        if args.timeout is not None:
            body["timeout"] = args.timeout
        if args.record:
            body["record-session"] = True
        resp = await c.post(f"/1.0/instances/{quote(args.name, safe='')}/exec", body)
        print(resp.operation_id)
        return 0
    stdin = None if args.disable_stdin else terminal.read_chunks(0)
    pending: set[asyncio.Task[Any]] = set()  # keep control sends referenced until done

    def control(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    with contextlib.ExitStack() as stack:
        if interactive and stdin_tty:  # raw before the command starts: no keystroke is cooked or lost
            stack.enter_context(terminal.raw_mode(0))
        session = await c.exec_start(
            args.name, args.command, interactive=interactive, env=_env(args.env), cwd=args.cwd or "",
            user=args.user, group=args.group, width=width, height=height, stdin=stdin,
            stdout_sink=terminal.fd_writer(1), stderr_sink=terminal.fd_writer(2), timeout=args.timeout,
            record=args.record,
        )
        if session.has_control:  # without one, signals keep their default effect on this process
            stack.enter_context(terminal.forward_signals(
                lambda sig: control(session.signal(sig)),
                (lambda: control(session.resize(*terminal.terminal_size(1)))) if interactive and stdout_tty
                else None))
        result = await session.wait()
    if session.recording:
        print(f"Recorded: {session.recording}", file=sys.stderr)
    if result.error:
        print(f"Error: {result.error}", file=sys.stderr)
        return result.return_code if result.return_code is not None and result.return_code > 0 else 1
    return result.return_code if result.return_code is not None else 1


# ---- entry point -------------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from broker import up  # lazy: only this subcommand needs Ray

    return int(up.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="execbroker", description="Cluster-aware exec broker (Incus API).")
    p.add_argument("--socket", default=None,
                   help="server unix socket (default: $EXECBROKER_SOCKET, else $EXECBROKER_DIR/unix.socket)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    up = sub.add_parser("up", help="start this node's broker (joins a cluster with --address)")
    up.add_argument("--address", help="Ray head HEAD:PORT to join; absent: start a new cluster")
    up.add_argument("--node-name", help="member name of this node")
    up.add_argument("--dir", help="data directory (default $EXECBROKER_DIR or /var/lib/execbroker)")
    up.add_argument("--node-ip", help="IP address Ray advertises for this node")
    up.add_argument("--workers", type=int, metavar="N",
                    help="front-end processes on this node, sharing its unix socket (default 1, at most 64; "
                         "$EXECBROKER_WORKERS)")
    up.add_argument("--port", type=int, help="head only: Ray GCS port (default: a free one)")
    up.add_argument("--https", metavar="IP:PORT",
                    help="also serve HTTPS here (sets core.https_address; kept across restarts)")
    up.add_argument("--redis", metavar="local|ADDRESS",
                    help="head only: keep Ray's cluster state in Redis (GCS fault tolerance), so the head "
                         "can be lost and restarted: 'local' runs redis-server under the data dir, or "
                         "HOST:PORT (rediss://HOST:PORT) names an existing one")
    up.add_argument("--cluster", action="store_true",
                    help="head only: start a cluster other machines join (advertises this machine's outward "
                         "address unless --node-ip says otherwise; without it the head keeps to loopback)")

    launch = sub.add_parser("launch", help="create and start an instance")
    launch.add_argument("name")
    launch.add_argument("--image", default="busybox", choices=("busybox", "debian", "host"))
    launch.add_argument("--target", help="cluster member to place it on")
    sub.add_parser("list", help="list instances")
    for action in ("start", "stop", "freeze", "unfreeze"):
        sp = sub.add_parser(action, help=f"{action} an instance")
        sp.add_argument("name")
        if action == "stop":
            sp.add_argument("-f", "--force", action="store_true", help="kill instead of a clean shutdown")
    delete = sub.add_parser("delete", help="delete an instance")
    delete.add_argument("name")
    delete.add_argument("-f", "--force", action="store_true", help="stop it first if running")

    at = sub.add_parser("attach", help="rejoin a detachable exec (execbroker exec --detach)")
    at.add_argument("operation", help="its operation id")
    at.add_argument("--from-start", action="store_true", help="replay all the output still held first")
    ex = sub.add_parser("exec", help="run a command in an instance", usage="%(prog)s [options] NAME -- CMD...")
    ex.add_argument("name", nargs="?")
    ex.add_argument("--all", action="store_true", help="on every running instance I can see (fan-out)")
    ex.add_argument("--select", action="append", default=[], metavar="KEY=VALUE",
                    help="on every running instance whose config has KEY=VALUE (repeatable; fan-out)")
    ex.add_argument("--concurrency", type=int, default=16, help="fan-out: at most this many at once")
    ex.add_argument("-t", "--force-interactive", action="store_true", help="allocate a terminal")
    ex.add_argument("-T", "--force-noninteractive", action="store_true", help="never allocate a terminal")
    ex.add_argument("-n", "--disable-stdin", action="store_true", help="empty stdin (implies -T)")
    ex.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable")
    ex.add_argument("--cwd", help="working directory")
    ex.add_argument("--user", type=int, default=0, help="uid to run as")
    ex.add_argument("--group", type=int, default=0, help="gid to run as")
    ex.add_argument("--record", action="store_true", help="keep the session as an asciicast v2 file")
    ex.add_argument("--detach", action="store_true",
                    help="start it and print its operation id; it runs on without a client (execbroker attach)")
    ex.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="stop the command after this long (SIGTERM, SIGKILL 3 s later): exit 124")
    ex.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    return p


HANDLERS = {"launch": cmd_launch, "list": cmd_list, "start": cmd_state, "stop": cmd_state,
            "freeze": cmd_state, "unfreeze": cmd_state, "delete": cmd_delete, "exec": cmd_exec,
            "attach": cmd_attach}


async def _run(args: argparse.Namespace) -> int:
    async with Client(args.socket or default_socket_path()) as c:
        return await HANDLERS[args.cmd](c, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse mangles a command containing options or a second "--": everything after the first "--"
    # is the command, verbatim.
    tail: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if tail:
        if args.cmd != "exec":
            parser.error(f"unexpected arguments: {' '.join(tail)}")
        args.command += tail
    if args.cmd == "up":
        return _up(args)
    try:
        return asyncio.run(_run(args))
    except (ClientError, UsageError) as e:
        print(f"Error: {e}", file=sys.stderr)
    except BrokenPipeError:  # our reader went away: die of SIGPIPE like a Unix filter (and lxc) does
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    except (httpx.TransportError, OSError) as e:
        print(f"Error: cannot reach {args.socket or default_socket_path()}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
