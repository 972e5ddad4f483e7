"""Fan-out exec (extension ``exec_fanout``): one request, one command, many instances, IO-free rules.

``POST /1.0/exec?project=P`` with ``{"command", "instances": [names] | "selector": {"config": {k: v}},
"concurrency", "timeout", "output-limit", "environment", "user", "group", "cwd"}``: every named instance,
or every running instance of the project whose config has all the selector's keys and values. At most
``concurrency`` commands run at once across the cluster; each instance's result (status, exit code, the
first ``output-limit`` bytes of stdout and stderr; with ``record-output`` the URLs of its whole output in
the instance's exec-output files) lands in the operation's metadata as it finishes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.errors import BadRequest
from core.execspec import check_timeout, first_error

MAX_INSTANCES = 10_000
MAX_CONCURRENCY = 1_000
DEFAULT_CONCURRENCY = 16
DEFAULT_OUTPUT_LIMIT = 64 << 10
MAX_OUTPUT_LIMIT = 1 << 20
RANGES = {"concurrency": (1, MAX_CONCURRENCY), "output_limit": (0, MAX_OUTPUT_LIMIT)}


class Selector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, str] = {}


class FanoutPost(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    command: list[str]
    instances: list[str] | None = None
    selector: Selector | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float | None = None
    output_limit: int = Field(DEFAULT_OUTPUT_LIMIT, alias="output-limit")
    record_output: bool = Field(False, alias="record-output")  # the whole output in exec-output files too
    environment: dict[str, str] | None = None
    user: int | None = None
    group: int | None = None
    cwd: str | None = None

    @field_validator("concurrency", "output_limit")
    @classmethod
    def _in_range(cls, v: int, info: ValidationInfo) -> int:
        low, high = RANGES[info.field_name or ""]
        if not low <= v <= high:
            raise ValueError(f"must be from {low} to {high}")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        return check_timeout(v)

    def exec_body(self) -> dict[str, Any]:
        """The per-instance exec (a task whose output is captured)."""
        return {"command": self.command, "environment": self.environment, "user": self.user,
                "group": self.group, "cwd": self.cwd, "timeout": self.timeout, "wait-for-websocket": False,
                "record-output": self.record_output}


def parse_fanout(body: bytes) -> FanoutPost:
    try:
        post = FanoutPost.model_validate_json(body)
    except ValueError as exc:
        raise BadRequest(first_error(exc)) from None
    if not post.command:
        raise BadRequest("Command is required")
    if (post.instances is None) == (post.selector is None):
        raise BadRequest('Give either "instances" or "selector"')
    if post.instances is not None:
        if not post.instances or len(post.instances) > MAX_INSTANCES or len(set(post.instances)) != len(post.instances):
            raise BadRequest(f'"instances" must name 1 to {MAX_INSTANCES} different instances')
    return post


def selected(config: dict[str, str], selector: Selector) -> bool:
    return all(config.get(k) == v for k, v in selector.config.items())


def summary(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    done = [r for r in results.values() if r["status"] in ("Success", "Failure")]
    return {"total": len(results), "done": len(done), "failed": sum(r["status"] == "Failure" for r in done),
            "running": sum(r["status"] == "Running" for r in results.values())}
