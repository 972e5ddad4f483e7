"""``execbroker exec --all`` / ``--select KEY=VALUE``: one command on many instances (extension
``exec_fanout``). Each instance's output is printed as its result comes in, every line prefixed with the
instance's name (stderr lines on stderr); then a summary. The exit status is the worst one: the highest
exit code, at least 1 when an instance could not run the command."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from client.api import Client, EventsClosed

FINAL = ("Success", "Failure", "Cancelled")


def selector(all_instances: bool, pairs: Sequence[str]) -> dict[str, dict[str, str]]:
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Bad selector {pair!r}: KEY=VALUE")
        config[key] = value
    if not all_instances and not config:
        raise ValueError("--select needs KEY=VALUE")
    return {"config": config}


class Printer:
    def __init__(self) -> None:
        self.printed: set[str] = set()

    def show(self, results: dict[str, dict[str, Any]]) -> None:
        for name in sorted(results):
            r = results[name]
            if r.get("status") not in FINAL or name in self.printed:
                continue
            self.printed.add(name)
            for text, stream in ((r.get("stdout", ""), sys.stdout), (r.get("stderr", ""), sys.stderr)):
                for line in text.splitlines():
                    print(f"{name} | {line}", file=stream)
            if r.get("truncated"):
                print(f"{name} | [output cut at the output limit]", file=sys.stderr)
            if r.get("error"):
                print(f"{name} | Error: {r['error']}", file=sys.stderr)
        sys.stdout.flush()


def worst(results: dict[str, dict[str, Any]]) -> int:
    codes = [int(r.get("return", 1)) for r in results.values() if r.get("status") == "Success"]
    failed = any(r.get("status") != "Success" for r in results.values())
    return max([*codes, 1 if failed else 0])


def table(results: dict[str, dict[str, Any]]) -> str:
    width = max([len("NAME"), *map(len, results)])
    rows = [f"{'NAME'.ljust(width)}  STATUS   EXIT"]
    for name in sorted(results):
        r = results[name]
        rows.append(f"{name.ljust(width)}  {str(r.get('status', '')).ljust(7)}  {r.get('return', '')}")
    ran = sum(r.get("status") == "Success" for r in results.values())
    rows.append(f"{len(results)} instances: {ran} ran, {len(results) - ran} failed")
    return "\n".join(rows)


async def run(c: Client, body: dict[str, Any]) -> int:
    events = await c.events(["operation"])  # before the POST: no update is missed
    async with events:
        resp = await c.post("/1.0/exec", body)
        op = resp.metadata
        printer = Printer()
        printer.show(op["metadata"]["results"])
        if op["status"] not in FINAL:
            try:
                async for event in events:
                    meta = event.get("metadata") or {}
                    if meta.get("id") != op["id"]:
                        continue
                    op = meta
                    printer.show(op["metadata"]["results"])
                    if op["status"] in FINAL:
                        break
            except EventsClosed:  # dropped for reading too slowly (each update is every result so far)
                op = await c.wait_operation(op["id"])
                printer.show(op["metadata"]["results"])
    results = op["metadata"]["results"]
    print(table(results))
    return worst(results)
