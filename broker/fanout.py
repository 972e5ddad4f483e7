"""Fan-out exec (extension ``exec_fanout``, rules in ``core/fanout.py``): one task operation on the
member that got the request; each instance's share runs on the member that owns it (``exec_capture``,
over the member link for another member's), at most ``concurrency`` at once across the cluster, and
each result goes into the operation's metadata as it comes (an operation event each time)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from core.errors import ApiError, BadRequest
from core.execspec import ExecPost
from core.fanout import FanoutPost, selected, summary
from core.identity import Identity
from core.operations import Operation, render
from node_agent.render import instance_url

if TYPE_CHECKING:
    from broker.frontend import Frontend


async def targets(frontend: Frontend, project: str, post: FanoutPost, who: Identity) -> list[str]:
    if post.instances is not None:
        return list(post.instances)
    assert post.selector is not None
    listed = await frontend.list_instances(project, 1, who)
    names = [i["name"] for i in listed if i.get("status") == "Running" and selected(i.get("config") or {}, post.selector)]
    if not names:
        raise BadRequest("No running instance matches the selector")
    return sorted(names)


async def start(frontend: Frontend, project: str, post: FanoutPost, who: Identity) -> dict[str, Any]:
    names = await targets(frontend, project, post, who)
    exec_post = ExecPost.model_validate(post.exec_body())
    results: dict[str, dict[str, Any]] = {n: {"status": "Pending"} for n in names}
    ops = frontend.local.ops
    op = ops.create("task", f"Executing command on {len(names)} instances",
                    {"instances": [instance_url(n, project) for n in names]},
                    {"command": post.command, "concurrency": post.concurrency, "results": results,
                     "summary": summary(results)}, who, project=project)

    async def one(name: str, slots: asyncio.Semaphore, op: Operation) -> None:
        async with slots:
            results[name] = {"status": "Running"}
            op.extend_metadata({"results": results, "summary": summary(results)})
            try:
                results[name] = await frontend.exec_capture(project, name, exec_post, who, post.output_limit)
            except ApiError as exc:
                results[name] = {"status": "Failure", "return": -1, "error": exc.message}
            op.extend_metadata({"results": results, "summary": summary(results)})

    async def run(op: Operation) -> None:
        slots = asyncio.Semaphore(post.concurrency)
        await asyncio.gather(*(one(n, slots, op) for n in names))

    ops.start(op, run)
    return render(op)
