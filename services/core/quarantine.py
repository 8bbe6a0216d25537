"""When a new version is rolled back, and who may train after: group testing of contributors.

When the evaluators refuse a round's model (it decrypts to noise, overflows, diverged or
collapsed), the clusterer knows only that someone among the round's contributors sent a bad
update: under `--secure he` nobody can see an update, and in the clear the damage may come
from several updates together. It finds the culprits the way adaptive group testing does.
A failed round counts a failure against every contributor whose update shaped the model
(cleared ones too: clearance is evidence, not a promise) and takes their clearance away; a
good round clears its contributors. While anyone is suspected, rounds train with the
cleared participants and a probe: half (rounded up) of the most suspected ones; a probe of
one trains alone, so that its failure convicts it and nobody else. A convicted participant
is never selected or asked to evaluate again. One forger among n suspects is found after
about log2(n) + 2 failed rounds; every other round makes progress. Convictions are sound:
a participant is convicted only by a failed round it made alone. An attacker that behaves
whenever it is probed is never convicted, but each round it spoils is rolled back.

Pure data and rules, persisted with the clusterer's state (`to_json`/`from_json`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# An evaluator whose accuracy of the new version fell by more than FALL from its accuracy
# of the version the round started from, to less than KEEP times it, counts against the new
# version: the model collapsed for it. Both, because honest non-IID rounds swing (benchmarks/
# guard.py --no-guard, 30 rounds, four partitions, seeds 1-4: the median evaluator lost up
# to 0.51 in a round on practical-noniid, keeping 0.36 of its accuracy or more, and on
# Dirichlet(0.3) kept nothing in some rounds, losing at most 0.23), while a model that
# collapses to chance from a trained one loses 0.6 or more and keeps a few per cent.
FALL = 0.5
KEEP = 0.25


class Verdict(Protocol):
    """What `judge` reads of an evaluation (the clusterer's Evaluation)."""

    @property
    def accuracy(self) -> float: ...
    @property
    def verdict(self) -> str: ...
    @property
    def reason(self) -> str: ...


@dataclass(frozen=True)
class Judgement:
    """The evaluators' verdict on a new version."""

    collapsed: bool  # most evaluators that answered refused it, or found it diverged or worse
    refused: int
    diverged: int
    reason: str = ""
    fell: int = 0  # evaluators whose accuracy fell by more than FALL


def collapsed(before: float, now: float) -> bool:
    """Whether an evaluator's accuracy collapsed: down by more than FALL, to less than KEEP
    times what it was."""
    return before - now > FALL and now < KEEP * before


def judge(
    evaluations: Mapping[str, Verdict], before: Mapping[str, float] | None = None
) -> Judgement:
    """Whether a version is to be rolled back: more of the evaluators that answered report
    REFUSED or DIVERGED, or an accuracy that collapsed from their own accuracy of the
    version before (`before`, by participant: `collapsed`), than not. Honest participants
    all see the same model (under --secure he they decrypt the same sum), so they agree;
    a minority of lying reports can neither force a rollback nor block one. Evaluators
    that did not answer count neither way."""
    before = before or {}
    refused = sum(e.verdict == "refused" for e in evaluations.values())
    diverged = sum(e.verdict == "diverged" for e in evaluations.values())
    fell = sum(
        e.verdict == "ok" and p in before and collapsed(before[p], e.accuracy)
        for p, e in evaluations.items()
    )
    bad = refused + diverged + fell
    if bad == 0 or bad * 2 <= len(evaluations):
        return Judgement(False, refused, diverged, fell=fell)
    parts = [f"{refused} refused the model"] if refused else []
    parts += [f"{diverged} found its loss not finite"] if diverged else []
    parts += [f"{fell} lost more than {FALL:g} accuracy and {1 - KEEP:.0%} of it"] if fell else []
    why = next((e.reason for e in evaluations.values() if e.verdict != "ok"), "")
    reason = f"{bad} of {len(evaluations)} evaluators: " + ", ".join(parts)
    if why:
        reason += f" (e.g. {why[:120]!r})"
    return Judgement(True, refused, diverged, reason, fell)


@dataclass
class Quarantine:
    """Failures per suspect, the cleared and the convicted participants."""

    suspects: dict[str, int] = field(default_factory=dict)
    cleared: set[str] = field(default_factory=set)
    convicted: set[str] = field(default_factory=set)

    def record(self, contributors: Iterable[str], failed: bool) -> list[str]:
        """Learn from a finished round: the participants whose updates shaped its model
        and whether the model failed (rolled back or its merge refused); the participants
        convicted by it."""
        who = set(contributors)
        if not who:
            return []
        if not failed:
            self.cleared |= who
            for p in who:
                self.suspects.pop(p, None)
            return []
        self.cleared -= who
        if len(who) == 1:
            (culprit,) = who
            self.suspects.pop(culprit, None)
            self.convicted.add(culprit)
            return [culprit]
        for p in who:
            self.suspects[p] = self.suspects.get(p, 0) + 1
        return []

    def probe(self, present: Iterable[str] | None = None) -> list[str]:
        """The suspects the next round tests: half (rounded up) of the most suspected ones
        among `present` (all when None), in id order."""
        here = set(self.suspects) if present is None else set(present) & set(self.suspects)
        if not here:
            return []
        top = max(self.suspects[p] for p in here)
        most = sorted(p for p in here if self.suspects[p] == top)
        return most[: (len(most) + 1) // 2]

    def eligible(self, participants: Iterable[str]) -> list[str]:
        """Who of participants may be selected now: nobody convicted; while some of them
        are suspected, the cleared ones and the probe (a probe of one alone: its failure
        convicts it and nobody else); otherwise, or when that leaves nobody, everyone."""
        ids = [p for p in participants if p not in self.convicted]
        probe = self.probe(ids)
        if not probe:
            return ids
        if len(probe) == 1:
            return probe
        allowed = (self.cleared & set(ids)) | set(probe)
        return [p for p in ids if p in allowed]

    def to_json(self) -> dict[str, Any]:
        """As the clusterer's snapshot keeps it."""
        return {
            "suspects": dict(sorted(self.suspects.items())),
            "cleared": sorted(self.cleared),
            "convicted": sorted(self.convicted),
        }

    @staticmethod
    def from_json(data: dict[str, Any] | None) -> Quarantine:
        """Read back (None: nothing was ever rolled back)."""
        if not data:
            return Quarantine()
        return Quarantine(
            {str(p): int(n) for p, n in data.get("suspects", {}).items()},
            {str(p) for p in data.get("cleared", [])},
            {str(p) for p in data.get("convicted", [])},
        )
