"""What the clusterer collects: pre-training deltas, one round's updates (the upload
reservations and what was received), the round in flight's plan, and evaluations.

Pure rules (no locking, no protobuf, no files): the state holds these under its condition
variable; the journal (services/clusterer/journal.py) writes and reads them back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.clusterer.board import Task, TaskKind
from services.common.figures import accuracy_summary, group_means
from services.core.errors import StateError
from services.core.quarantine import Judgement
from services.core.sketch import SKETCH_ABOVE, SKETCH_DIM, count_sketch

# The steps of the round in flight: planned (pre-round evaluation next), training,
# aggregating (Aggregate may have been called), aggregated (post-round evaluation next).
STEPS = ("planned", "training", "aggregating", "aggregated")


@dataclass
class Evaluation:
    """One participant's evaluation of a model version."""

    accuracy: float
    loss: float
    examples: int
    personal_accuracy: float | None = None  # --personalise: of its cluster's model
    personal_loss: float | None = None
    # "ok", or what the participant found instead of a usable model (VERDICTS): "refused"
    # (not adopted: non-finite or absurd values) or "diverged" (its loss is not finite).
    verdict: str = "ok"
    reason: str = ""


def accuracy_fields(
    evals: Mapping[str, Evaluation], groups: Mapping[str, int], clusters: Mapping[str, int]
) -> dict[str, Any]:
    """A history record's figures of one evaluation of the global model: the summary of
    the accuracies, the mean loss, and the mean accuracy per true group and per cluster."""
    accs = {p: e.accuracy for p, e in evals.items()}
    s = accuracy_summary(list(accs.values())) if accs else None
    return {
        "evaluated": len(evals),
        "mean_accuracy": s.mean if s else 0.0,
        "accuracy_std": s.std if s else 0.0,
        "worst_accuracy": s.worst if s else 0.0,
        "worst_decile_accuracy": s.worst_decile if s else 0.0,
        "mean_loss": float(np.mean([e.loss for e in evals.values()])) if evals else 0.0,
        "group_accuracy": group_means(accs, groups),
        "cluster_accuracy": group_means(accs, clusters),
    }


@dataclass
class RoundCollection:
    """The round whose updates are accepted now."""

    round: int
    model_version: int
    selected: dict[str, int]  # participant -> cluster
    received: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    closed: bool = False  # the deadline passed: no new upload may begin
    cutters: dict[str, Callable[[], None]] = field(default_factory=dict)  # cancel an upload
    began: dict[str, float] = field(default_factory=dict)  # when each upload began
    longest_upload_s: float = 0.0  # the slowest accepted upload stream
    enough: int | None = None  # over-selection: the round closes at this many updates

    def reserve(
        self, pid: str, round_: int, model_version: int, cut: Callable[[], None] | None
    ) -> int:
        """Check that pid may upload its update for round_ now and reserve it; its cluster."""
        if pid in self.received or pid in self.in_flight:
            raise StateError(
                f"duplicate submission: {pid} already sent its update for round {round_}"
            )
        if round_ != self.round or self.closed:
            now = f"the open round is {self.round}"
            if self.closed:
                now = f"round {self.round} is past its deadline"
            raise StateError(f"round {round_} does not take updates now ({now})")
        if pid not in self.selected:
            raise StateError(f"{pid[:64]} was not selected in round {self.round}")
        if model_version != self.model_version:
            raise StateError(
                f"trained from model version {model_version}, "
                f"round {self.round} uses {self.model_version}"
            )
        return self._hold(pid, cut)

    def _hold(self, pid: str, cut: Callable[[], None] | None) -> int:
        """Reserve pid's upload (cancellable with `cut`); its cluster."""
        self.in_flight.add(pid)
        self.began[pid] = time.monotonic()
        if cut is not None:
            self.cutters[pid] = cut
        return self.selected[pid]

    def release(self, pid: str, accepted: bool) -> None:
        """End pid's reservation; an accepted upload's time counts toward the slowest."""
        self.in_flight.discard(pid)
        self.cutters.pop(pid, None)
        began = self.began.pop(pid, None)
        if accepted and began is not None:
            self.longest_upload_s = max(self.longest_upload_s, time.monotonic() - began)

    def takes(self, round_: int) -> bool:
        """Whether an upload of round_ counts in this collection."""
        return self.round == round_

    def unheard(self, participants: Iterable[str]) -> list[str]:
        """Of participants, the selected ones neither received nor streaming, sorted."""
        return sorted(set(participants) & set(self.selected) - self.received - self.in_flight)

    def all_received(self) -> bool:
        """Whether the round has what it waits for: every selected update, or (over-
        selection) the first `enough` of them."""
        if self.enough is not None and len(self.received) >= self.enough:
            return True
        return self.received >= set(self.selected)


@dataclass
class AsyncCollection(RoundCollection):
    """--mode async: the collection that never closes. Any member holding a TRAIN task may
    upload for it whenever it is done (the task's version, whatever the round); `selected`
    is every member's cluster, `received` the updates waiting in the aggregator's buffers
    (a member with one there gets no new task until its buffer is flushed: one update per
    participant and buffer, so a fast participant cannot fill a buffer alone)."""

    board: Mapping[str, Task] = field(default_factory=dict)  # the TaskBoard, read under the cond

    def takes(self, round_: int) -> bool:
        return True

    def reserve(
        self, pid: str, round_: int, model_version: int, cut: Callable[[], None] | None
    ) -> int:
        """Check that pid holds a TRAIN task of model_version and may upload now."""
        if pid in self.received or pid in self.in_flight:
            raise StateError(
                f"duplicate submission: {pid[:64]} has an update in its cluster's buffer already"
            )
        task = self.board.get(pid)
        if task is None or task.kind != TaskKind.TRAIN or pid not in self.selected:
            raise StateError(f"{pid[:64]} has no training task now (ask for a new one)")
        if model_version != task.model_version:
            raise StateError(
                f"trained from model version {model_version}, the task was version "
                f"{task.model_version} (ask for a new one)"
            )
        return self._hold(pid, cut)

    def buffered(self) -> dict[int, int]:
        """Updates waiting per cluster."""
        counts: dict[int, int] = {}
        for p in self.received:
            c = self.selected.get(p, -1)
            counts[c] = counts.get(c, 0) + 1
        return counts


def no_upload_open(round_: int) -> StateError:
    """The refusal of an upload when no round is open."""
    return StateError(f"round {round_} does not take updates now (no round is open)")


@dataclass
class RoundProgress:
    """The round in flight, as far as it got: made once and persisted, so a restarted
    clusterer finishes it with the same plan instead of drawing (or dropping) it again."""

    round: int
    step: str  # one of STEPS
    selected: dict[str, int]  # participant -> cluster
    evaluators: list[str]  # evaluate the current model before training (q-weights)
    started: float  # wall-clock time.time() the round began (its duration spans restarts)
    cluster_accuracy: dict[int, float] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)  # set when collection closes
    timed_out: list[str] = field(default_factory=list)
    abandon: bool = False
    reply: dict[str, Any] | None = None  # the aggregator's AggregateResponse, as JSON
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES)
    base_version: int = -1  # the version the round trains from (its rollback target)
    judgement: Judgement | None = None  # the evaluators' verdict, saved when it collapsed
    rollback: dict[str, Any] | None = None  # the aggregator's RollbackResponse, as JSON

    def shaped(self) -> list[str]:
        """Whose updates shaped the model: received, and not rejected by the defence."""
        rejected = {r.get("participant_id") for r in (self.reply or {}).get("rejected", [])}
        return [q for q in self.received if q not in rejected]


class Pretraining:
    """The pre-training deltas clustering groups, and the clusters' centroids (late joiners
    join the nearest)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed  # of the count sketch
        self.deltas: dict[str, torch.Tensor] = {}
        self.files: dict[str, str] = {}  # participant -> its stored delta
        self.centroids: dict[int, torch.Tensor] = {}
        self.centroids_file: str | None = None  # where the store keeps them

    def sketched(self, delta: torch.Tensor) -> torch.Tensor:
        """The delta as kept: sketched when long."""
        if delta.numel() > SKETCH_ABOVE:
            return count_sketch(delta.unsqueeze(0), SKETCH_DIM, self.seed)[0]
        return delta

    def nearest(self, delta: torch.Tensor, cluster: int) -> int:
        """The cluster a member with delta joins: its own if it has one, else the nearest
        centroid's (none for a non-finite delta, or before clustering)."""
        fit = bool(torch.isfinite(delta.double().norm()))
        if self.centroids and cluster < 0 and fit:
            dist = {c: float((delta - v).norm()) for c, v in self.centroids.items()}
            return min(dist, key=dist.__getitem__)
        return cluster

    def add(self, pid: str, delta: torch.Tensor, name: str) -> None:
        self.deltas[pid] = delta
        if name:
            self.files[pid] = name

    def set_centroids(self, assignment: np.ndarray, deltas: torch.Tensor) -> None:
        """The mean delta of each cluster of assignment."""
        self.centroids = {
            int(c): deltas[torch.as_tensor(assignment == c)].mean(dim=0)
            for c in np.unique(assignment)
        }

    def have(self, participants: Iterable[str]) -> bool:
        return all(p in self.deltas for p in participants)

    def in_order(self) -> tuple[list[str], list[torch.Tensor]]:
        have = sorted(self.deltas)
        return have, [self.deltas[p] for p in have]


class Evaluations:
    """Evaluations in progress by tag: who was asked and what came in."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Evaluation]] = {}
        self.asked: dict[str, list[str]] = {}  # evaluation tag -> who was asked

    def start(self, tag: str, participants: Iterable[str]) -> tuple[list[str], list[str]]:
        """Open tag for participants; (everyone asked, those without a result yet)."""
        asked = sorted(participants)
        got = self.results.setdefault(tag, {})
        self.asked[tag] = asked
        return asked, [p for p in asked if p not in got]

    def done(self, tag: str, participants: Iterable[str]) -> bool:
        got = self.results.get(tag, {})
        return all(p in got for p in participants)

    def finish(self, tag: str) -> dict[str, Evaluation]:
        self.asked.pop(tag, None)
        return dict(self.results.pop(tag, {}))

    def restore(self, tag: str, asked: Iterable[str], results: Mapping[str, Evaluation]) -> None:
        self.asked[tag] = list(asked)
        self.results[tag] = dict(results)
