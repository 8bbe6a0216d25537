"""The clusterer's state and its rules, in one place, under one condition variable.

Who may join and how a late joiner is grouped, which task a participant has, whether an
upload may begin and what finishing it means, which evaluations count: all of it is a
method here, as AggregatorState is for the aggregator. RPC handlers call these methods and
pack the answers; the coordinator thread drives the phases through them and waits on
`cond`, which every change notifies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from services.clusterer.clustering import count_sketch
from services.clusterer.plan import static_group
from services.common.errors import CapacityError, NotFoundError, StateError
from services.common.figures import purity
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.strategies import Strategy

SKETCH_ABOVE = 4096  # pre-training deltas longer than this are kept as CountSketches
SKETCH_DIM = 2048
TERMINAL = ("done", "failed")


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


@dataclass
class Task:
    """The task a participant should work on now; kept until it is done or cancelled."""

    kind: int  # pb.TaskKind
    round: int
    model_version: int
    evaluation_id: str = ""


@dataclass
class Evaluation:
    """One participant's evaluation of a model version."""

    accuracy: float
    loss: float
    examples: int


@dataclass
class RoundCollection:
    """The round whose updates are accepted now."""

    round: int
    model_version: int
    selected: dict[str, int]  # participant -> cluster
    received: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class StatusView:
    """A consistent copy of what the status RPC shows."""

    phase: str
    round: int
    model_version: int
    history: list[dict[str, Any]]
    clusters: list[tuple[str, int, int]]  # participant, cluster, true group
    purity: float | None
    error: str
    members_total: int = 0
    history_total: int = 0


class ClustererState:
    """Members, tasks, the open round and what every finished round measured."""

    def __init__(
        self,
        strategy: Strategy,
        seed: int = 0,
        max_members: int = 10_000,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.seed = seed
        self.max_members = max_members
        self._on_phase = on_phase  # told every phase change (the phase metric)
        # waiting, pretraining, clustering, selecting, evaluating, training, aggregating,
        # done, failed
        self.phase = ""
        self._enter("waiting")
        self.round = -1
        self.model_version = 0
        self.members: dict[str, Member] = {}
        self.tasks: dict[str, Task] = {}
        self.collecting: RoundCollection | None = None
        self.pretrain_deltas: dict[str, torch.Tensor] = {}
        self.centroids: dict[int, torch.Tensor] = {}
        self.evaluations: dict[str, dict[str, Evaluation]] = {}
        self.history: list[dict[str, Any]] = []
        self.purity: float | None = None
        self.error = ""
        self.cond = threading.Condition()

    # ---- participants' side (RPC handlers) --------------------------------------------
    def join(self, pid: str, num_train: int, num_test: int, group: int, device: str) -> bool:
        """Admit a participant (idempotent); returns whether it is new.

        A late joiner of a clustered federation gets a pre-training task and joins the
        nearest cluster when its delta arrives; otherwise it takes its static group.
        """
        with self.cond:
            known = self.members.get(pid)
            if known is not None:
                known.last_seen = time.monotonic()
                return False
            if len(self.members) >= self.max_members:
                raise CapacityError(
                    f"the federation is full ({self.max_members} participants, --max-participants)"
                )
            member = Member(pid, num_train, num_test, group, device, time.monotonic())
            self.members[pid] = member
            if self.phase != "waiting":
                if self.strategy.clustered:
                    self.tasks[pid] = Task(pb.TASK_KIND_PRETRAIN, -1, 0)
                else:
                    member.cluster = static_group(self.strategy, len(self.members) - 1) or 0
            self.cond.notify_all()
            return True

    def _member(self, pid: str) -> Member:
        m = self.members.get(pid)
        if m is None:
            raise NotFoundError(f"unknown participant {pid[:64]!r}: call Join first")
        m.last_seen = time.monotonic()
        return m

    def next_task(self, pid: str, wait_s: float, alive: Callable[[], bool]) -> Task | None:
        """The participant's task, waiting up to wait_s for one (None: nothing to do yet)."""
        with self.cond:
            self._member(pid)
            deadline = time.monotonic() + wait_s
            while pid not in self.tasks and alive() and self.phase not in TERMINAL:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            self._member(pid)
            return self.tasks.get(pid)

    def idle_answer(self) -> tuple[int, int, int]:
        """(kind, round, model version) for a participant without a task."""
        with self.cond:
            kind = pb.TASK_KIND_DONE if self.phase in TERMINAL else pb.TASK_KIND_WAIT
            return kind, self.round, self.model_version

    def begin_upload(self, pid: str, round_: int, model_version: int) -> int:
        """Check that pid may upload its update for round_ now; reserve it; its cluster."""
        with self.cond:
            self._member(pid)
            open_ = self.collecting
            if open_ is not None and (pid in open_.received or pid in open_.in_flight):
                raise StateError(
                    f"duplicate submission: {pid} already sent its update for round {round_}"
                )
            if open_ is None or round_ != open_.round:
                now = "no round is open" if open_ is None else f"the open round is {open_.round}"
                raise StateError(f"round {round_} does not take updates now ({now})")
            if pid not in open_.selected:
                raise StateError(f"{pid[:64]} was not selected in round {open_.round}")
            if model_version != open_.model_version:
                raise StateError(
                    f"trained from model version {model_version}, "
                    f"round {open_.round} uses {open_.model_version}"
                )
            open_.in_flight.add(pid)
            return open_.selected[pid]

    def finish_upload(self, pid: str, round_: int, accepted: bool) -> None:
        """Release the reservation; an accepted update counts and ends the TRAIN task."""
        with self.cond:
            open_ = self.collecting
            if open_ is None or open_.round != round_:
                return
            open_.in_flight.discard(pid)
            if accepted:
                open_.received.add(pid)
                task = self.tasks.get(pid)
                if task is not None and task.kind == pb.TASK_KIND_TRAIN:
                    del self.tasks[pid]
            self.cond.notify_all()

    def check_pretrain_task(self, pid: str) -> None:
        """Raise unless pid has an open pre-training task."""
        with self.cond:
            self._member(pid)
            task = self.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_PRETRAIN:
                raise StateError(f"{pid} has no pre-training task")

    def accept_pretrain_delta(self, pid: str, delta: torch.Tensor) -> None:
        """Store a pre-training delta (sketched when long); a late joiner joins a cluster."""
        if delta.numel() > SKETCH_ABOVE:
            delta = count_sketch(delta.unsqueeze(0), SKETCH_DIM, self.seed)[0]
        with self.cond:
            task = self.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_PRETRAIN:
                raise StateError(f"{pid}'s pre-training task was withdrawn (too late)")
            self.pretrain_deltas[pid] = delta
            member = self.members[pid]
            fit = bool(torch.isfinite(delta.double().norm()))
            if self.centroids and member.cluster < 0 and fit:
                dist = {c: float((delta - v).norm()) for c, v in self.centroids.items()}
                member.cluster = min(dist, key=dist.__getitem__)
            del self.tasks[pid]
            self.cond.notify_all()

    def record_evaluation(self, pid: str, tag: str, model_version: int, result: Evaluation) -> None:
        """Count pid's evaluation if it answers its open evaluation task."""
        with self.cond:
            self._member(pid)
            task = self.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_EVALUATE or task.evaluation_id != tag:
                raise StateError(f"{pid} has no open evaluation {tag[:64]!r}")
            if model_version != task.model_version:
                raise StateError(
                    f"evaluated version {model_version}, the task asked for {task.model_version}"
                )
            results = self.evaluations.get(tag)
            if results is not None:
                results[pid] = result
            del self.tasks[pid]
            self.cond.notify_all()

    # ---- the coordinator's side -------------------------------------------------------
    def _enter(self, name: str) -> None:
        """Change phase (cond held); the listener hears of it."""
        self.phase = name
        if self._on_phase is not None:
            self._on_phase(name)

    def set_phase(self, name: str) -> None:
        """Enter a phase and wake the waiters."""
        with self.cond:
            self._enter(name)
            self.cond.notify_all()

    def wait_until(
        self, done: Callable[[], bool], timeout: float | None, stop: threading.Event
    ) -> bool:
        """Wait until done() (checked under the lock), the timeout, or stop; done()'s value."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not done():
                left = 5.0 if deadline is None else deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return done()
                self.cond.wait(left)
            return True

    def assign(self, tasks: Mapping[str, Task]) -> None:
        """Hand out tasks and wake the long polls."""
        with self.cond:
            self.tasks.update(tasks)
            self.cond.notify_all()

    def cancel(self, participants: Iterable[str], kind: int) -> list[str]:
        """Withdraw unfinished tasks of a kind; who had one (a timeout on their record)."""
        with self.cond:
            missed = [p for p in participants if p in self.tasks and self.tasks[p].kind == kind]
            for p in missed:
                del self.tasks[p]
                self.members[p].timeouts += 1
            return missed

    def member_ids(self) -> list[str]:
        """Every member, sorted."""
        with self.cond:
            return sorted(self.members)

    def assign_static_groups(self) -> None:
        """Group every member without clustering (one group, or each its own)."""
        with self.cond:
            for i, p in enumerate(sorted(self.members)):
                self.members[p].cluster = static_group(self.strategy, i) or 0

    def start_pretraining(self) -> list[str]:
        """Give every member a pre-training task; the members asked."""
        with self.cond:
            self._enter("pretraining")
            members = sorted(self.members)
            self.tasks.update({p: Task(pb.TASK_KIND_PRETRAIN, -1, 0) for p in members})
            self.cond.notify_all()
            return members

    def pretrained(self) -> tuple[list[str], list[torch.Tensor]]:
        """Who sent a pre-training delta, and the deltas, in id order."""
        with self.cond:
            have = sorted(self.pretrain_deltas)
            return have, [self.pretrain_deltas[p] for p in have]

    def set_clusters(
        self, participants: list[str], assignment: np.ndarray, deltas: torch.Tensor
    ) -> float | None:
        """Record the clustering and its centroids (for late joiners); the purity against
        the ground-truth groups members reported (None when some have none)."""
        with self.cond:
            for p, c in zip(participants, assignment.tolist(), strict=True):
                self.members[p].cluster = int(c)
            self.centroids = {
                int(c): deltas[torch.as_tensor(assignment == c)].mean(dim=0)
                for c in np.unique(assignment)
            }
            truth = np.array([self.members[p].group for p in participants])
            self.purity = purity(assignment, truth) if (truth >= 0).all() else None
            return self.purity

    def joined(self) -> int:
        """How many participants joined."""
        with self.cond:
            return len(self.members)

    def has_pretrained(self, participants: Iterable[str]) -> bool:
        """Whether every one of participants sent its pre-training delta."""
        with self.cond:
            return all(p in self.pretrain_deltas for p in participants)

    def start_round(self, round_: int) -> None:
        """Enter round_: selection comes next."""
        with self.cond:
            self.round = round_
            self._enter("selecting")
            self.cond.notify_all()

    def active_groups(self, liveness_s: float) -> dict[str, int]:
        """Grouped members heard from recently or busy with a task, by id."""
        now = time.monotonic()
        with self.cond:
            return {
                p: m.cluster
                for p, m in sorted(self.members.items())
                if m.cluster >= 0 and (now - m.last_seen <= liveness_s or p in self.tasks)
            }

    def start_evaluation(self, tag: str, participants: Iterable[str]) -> list[str]:
        """Ask participants to evaluate the current model; the ones asked."""
        with self.cond:
            asked = sorted(participants)
            self.evaluations[tag] = {}
            self.tasks.update(
                {p: Task(pb.TASK_KIND_EVALUATE, self.round, self.model_version, tag) for p in asked}
            )
            self.cond.notify_all()
            return asked

    def evaluated(self, tag: str, participants: Iterable[str]) -> bool:
        """Whether every one of participants reported (call inside wait_until)."""
        got = self.evaluations.get(tag, {})
        return all(p in got for p in participants)

    def finish_evaluation(self, tag: str) -> dict[str, Evaluation]:
        """Close an evaluation; the results that came in."""
        with self.cond:
            return dict(self.evaluations.pop(tag, {}))

    def open_round(self, round_: int, selected: Mapping[str, int]) -> None:
        """Start collecting round_'s updates from the selected participants."""
        with self.cond:
            self._enter("training")
            self.collecting = RoundCollection(round_, self.model_version, dict(selected))
            self.tasks.update(
                {p: Task(pb.TASK_KIND_TRAIN, round_, self.model_version) for p in selected}
            )
            self.cond.notify_all()

    def all_received(self) -> bool:
        """Whether every selected participant's update is in (call inside wait_until)."""
        c = self.collecting
        return c is not None and c.received >= set(c.selected)

    def close_round(self) -> tuple[int, list[str]]:
        """Stop collecting: how many updates came, and who was too late (tasks withdrawn)."""
        with self.cond:
            c = self.collecting
            self.collecting = None
            self._enter("aggregating")
            if c is None:
                return 0, []
            late = [
                p
                for p in c.selected
                if p in self.tasks and self.tasks[p].kind == pb.TASK_KIND_TRAIN
            ]
            for p in late:
                del self.tasks[p]
                self.members[p].timeouts += 1
            self.cond.notify_all()
            return len(c.received), late

    def set_model_version(self, version: int) -> None:
        """The global model version participants work from now."""
        with self.cond:
            self.model_version = max(self.model_version, version)

    def record_round(self, record: dict[str, Any]) -> None:
        """Append a finished round to the history."""
        with self.cond:
            self.history.append(record)
            self.cond.notify_all()

    def finish(self, rounds: int) -> None:
        """The federation is done: every member's next task is DONE."""
        with self.cond:
            self._enter("done")
            for p in self.members:
                self.tasks[p] = Task(pb.TASK_KIND_DONE, rounds, self.model_version)
            self.cond.notify_all()

    def fail(self, error: str) -> None:
        """The federation failed; the service stays up to report it."""
        with self.cond:
            self._enter("failed")
            self.error = error
            self.cond.notify_all()

    def view(self, members: slice = slice(None), rounds: slice = slice(None)) -> StatusView:
        """What GetStatus reports (a page of the members, in id order, and of the rounds),
        copied under the lock."""
        with self.cond:
            ids = sorted(self.members)[members]
            return StatusView(
                self.phase,
                self.round,
                self.model_version,
                self.history[rounds],
                [(p, self.members[p].cluster, self.members[p].group) for p in ids],
                self.purity,
                self.error,
                len(self.members),
                len(self.history),
            )

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of everything but the cached deltas and the lock."""
        with self.cond:
            return {
                "phase": self.phase,
                "round": self.round,
                "model_version": self.model_version,
                "members": {p: asdict(m) for p, m in self.members.items()},
                "history": list(self.history),
                "purity": self.purity,
                "error": self.error,
            }
