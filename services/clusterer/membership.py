"""Membership: who joined, with what, in which cluster, and who may still train.

Pure rules (no locking, no protobuf, no files): the state holds one Membership under its
condition variable; the journal (services/clusterer/journal.py) writes and reads it back.
The quarantine (services/core/quarantine.py) keeps the suspicion and conviction flags of
rounds that were rolled back.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.core.errors import CapacityError, NotFoundError
from services.core.plan import static_group
from services.core.quarantine import Quarantine
from services.core.strategies import Strategy


@dataclass
class Member:
    """A joined participant."""

    participant_id: str
    num_train: int
    num_test: int
    group: int
    device: str
    last_seen: float
    cluster: int = -1
    timeouts: int = 0


def member_of(data: Mapping[str, Any]) -> Member:
    """A member read back (its last_seen is set anew: the clock is this process's)."""
    return Member(**{**data, "last_seen": time.monotonic()})


class Membership:
    """The members by id and the quarantine of those whose rounds were rolled back."""

    def __init__(self, strategy: Strategy, max_members: int = 10_000) -> None:
        self.strategy = strategy
        self.max_members = max_members
        self.members: dict[str, Member] = {}
        self.quarantine = Quarantine()  # who may train after rolled-back rounds

    def admit(
        self, pid: str, num_train: int, num_test: int, group: int, device: str, late: bool
    ) -> Member | None:
        """A new member (not yet added: `add` it once its join is durable), or None for a
        known one (heard from now). A late joiner of an unclustered federation takes its
        static group; one of a clustered federation waits for its pre-training delta."""
        known = self.members.get(pid)
        if known is not None:
            known.last_seen = time.monotonic()
            return None
        if len(self.members) >= self.max_members:
            raise CapacityError(
                f"the federation is full ({self.max_members} participants, --max-participants)"
            )
        member = Member(pid, num_train, num_test, group, device, time.monotonic())
        if late and not self.strategy.clustered:
            member.cluster = static_group(self.strategy, len(self.members)) or 0
        return member

    def add(self, member: Member) -> None:
        self.members[member.participant_id] = member

    def touch(self, pid: str) -> Member:
        """A member, heard from now (NotFoundError for a stranger)."""
        m = self.members.get(pid)
        if m is None:
            raise NotFoundError(f"unknown participant {pid[:64]!r}: call Join first")
        m.last_seen = time.monotonic()
        return m

    def all_heard_now(self) -> None:
        """Everyone counts as just heard from (after a restart)."""
        now = time.monotonic()
        for m in self.members.values():
            m.last_seen = now

    def timed_out(self, participants: Iterable[str]) -> None:
        """Note a missed deadline on each one's record."""
        for p in participants:
            self.members[p].timeouts += 1

    def active_groups(self, liveness_s: float, busy: Container[str]) -> dict[str, int]:
        """Grouped, unconvicted members heard from recently or busy with a task, by id."""
        now = time.monotonic()
        convicted = self.quarantine.convicted
        return {
            p: m.cluster
            for p, m in sorted(self.members.items())
            if m.cluster >= 0
            and p not in convicted
            and (now - m.last_seen <= liveness_s or p in busy)
        }

    def selectable(self, groups: Mapping[str, int]) -> dict[str, int]:
        """Of groups, those a round may select while rolled-back rounds are being traced to
        their contributors (quarantine.py): all of them when none is suspected."""
        allowed = set(self.quarantine.eligible(groups))
        return {p: c for p, c in groups.items() if p in allowed}

    def assign_static_groups(self) -> None:
        """Group every member without clustering (one group, or each its own)."""
        for i, p in enumerate(sorted(self.members)):
            self.members[p].cluster = static_group(self.strategy, i) or 0

    def set_clusters(self, clusters: Mapping[str, int]) -> None:
        for p, c in clusters.items():
            self.members[p].cluster = int(c)

    def true_groups(self) -> dict[str, int]:
        """The ground-truth group each member joined with (-1: none), by id."""
        return {p: m.group for p, m in self.members.items()}

    def cluster_ids(self) -> list[int]:
        """The clusters members are in, ascending."""
        return sorted({m.cluster for m in self.members.values() if m.cluster >= 0})

    def clusters_of(self, participants: Iterable[str]) -> dict[str, int]:
        """The cluster of each of participants."""
        return {p: self.members[p].cluster for p in participants if p in self.members}
