"""The cluster directory: which member owns each instance, and where members listen. (Operations are not
here: every member learns each operation's owner from the owner's events, and asks its peers over the
member links about one it has not heard of, so an exec costs no Ray call.)

Soft state: every agent re-registers its member record and instances whenever the
directory's incarnation changes (a restarted directory starts empty) and when the agent (re)starts, so
losing the directory loses nothing. Actor methods run one at a time, which makes ``claim_instance``
the cluster-wide arbiter of instance names (409 for the loser of a race).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from core.errors import Conflict

DIRECTORY_NAME = "execbroker-directory"


@dataclass
class Member:
    name: str
    node_id: str
    address: str  # host:port of the member's listener for member-to-member traffic
    instances: set[str] = field(default_factory=set)  # instance keys (records.key)
    https: str = ""  # host:port of its HTTPS listener for clients ("" without one)


class DirectoryState:
    """The directory's logic, IO-free (the Ray actor below only wraps it)."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.members: dict[str, Member] = {}
        self.owner: dict[str, str] = {}  # instance -> member

    def register_member(self, name: str, node_id: str, address: str, instances: list[str],
                        https: str = "") -> list[str]:
        """A (re)started agent's full state; returns its instances already owned by another member."""
        old = self.members.get(name)
        if old is not None:
            for inst in old.instances:
                if self.owner.get(inst) == name:
                    del self.owner[inst]
        member = Member(name, node_id, address, https=https)
        self.members[name] = member
        clashes = []
        for inst in instances:
            holder = self.owner.get(inst)
            if holder is not None and holder != name:
                clashes.append(inst)
                continue
            self.owner[inst] = name
            member.instances.add(inst)
        return clashes

    def claim_instance(self, name: str, member: str) -> None:
        holder = self.owner.get(name)
        if holder is not None:
            raise Conflict(f'Instance "{name}" already exists' + ("" if holder == member else f" on {holder}"))
        self.owner[name] = member
        self.members[member].instances.add(name)

    def release_instance(self, name: str, member: str) -> None:
        if self.owner.get(name) == member:
            del self.owner[name]
        if member in self.members:
            self.members[member].instances.discard(name)

    def locate_instance(self, name: str) -> str | None:
        return self.owner.get(name)

    def member_table(self) -> dict[str, dict[str, object]]:
        return {m.name: {"node_id": m.node_id, "address": m.address, "instances": sorted(m.instances),
                         "https": m.https} for m in self.members.values()}

    def load_members(self, table: dict[str, dict[str, object]]) -> None:
        """A restarted directory's memory of members (a lost one cannot re-register its instances)."""
        for name, m in table.items():
            member = Member(name, str(m["node_id"]), str(m["address"]), set(m["instances"]),  # type: ignore[arg-type]
                            str(m.get("https", "")))
            self.members[name] = member
            for inst in member.instances:
                self.owner.setdefault(inst, name)


def make_actor():  # type: ignore[no-untyped-def]
    import json

    import ray
    from ray.experimental import internal_kv

    key = b"execbroker/directory-members"

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class Directory:
        """The member table is also kept in the GCS key-value store: agents re-register what they own
        when the directory restarts, but a member that is down meanwhile cannot, and its instances must
        still read as offline (never as unknown)."""

        def __init__(self) -> None:
            self.state = DirectoryState()
            saved = internal_kv._internal_kv_get(key)
            if saved:
                self.state.load_members(json.loads(saved))
            self._saved = saved or b""

        def _save(self) -> None:
            table = json.dumps(self.state.member_table(), sort_keys=True).encode()
            if table != self._saved:
                internal_kv._internal_kv_put(key, table, overwrite=True)
                self._saved = table

        def epoch(self) -> str:
            return self.state.epoch

        def register_member(self, name: str, node_id: str, address: str, instances: list[str],
                            https: str = "") -> tuple[str, list[str]]:
            clashes = self.state.register_member(name, node_id, address, instances, https)
            self._save()
            return self.state.epoch, clashes

        def claim_instance(self, name: str, member: str) -> tuple[int, str]:
            try:
                self.state.claim_instance(name, member)
            except Conflict as exc:
                return exc.status, exc.message
            self._save()
            return 0, ""

        def release_instance(self, name: str, member: str) -> None:
            self.state.release_instance(name, member)
            self._save()

        def locate_instance(self, name: str) -> str | None:
            return self.state.locate_instance(name)

        def members(self) -> dict[str, dict[str, object]]:
            return self.state.member_table()

    return Directory
