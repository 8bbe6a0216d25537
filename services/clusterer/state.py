"""The clusterer's state: its rules composed, under one condition variable.

The rules live in small pure modules: membership.py (who joined, their clusters, the
quarantine), board.py (the task board), collection.py (pre-training deltas, one round's
uploads, the round in flight's plan, evaluations). This class holds one of each, the phase
and the history, under `cond`, which every change notifies: RPC handlers call its methods
and pack the answers; the coordinator thread drives the phases through them.

With a store (`attach`), every change is durable before it is acknowledged: the durability
layer around the rules is journal.py (the journal, the snapshot and the replay).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from services.clusterer.board import Task, TaskBoard, TaskKind, TaskListener
from services.clusterer.collection import (
    STEPS,
    AsyncCollection,
    Evaluation,
    Evaluations,
    Pretraining,
    RoundCollection,
    RoundProgress,
    no_upload_open,
)
from services.clusterer.journal import Journal, changes
from services.clusterer.membership import Member, Membership
from services.clusterer.store import ClustererStore
from services.common.figures import purity
from services.core.accountant import Step
from services.core.errors import StateError
from services.core.quarantine import Judgement, Quarantine
from services.core.record import RoundRecord
from services.core.strategies import Strategy

__all__ = [
    "STEPS",
    "ClustererState",
    "Concluded",
    "Evaluation",
    "Member",
    "RoundCollection",
    "RoundProgress",
    "StatusView",
    "Task",
    "TaskKind",
    "changes",
]

TERMINAL = ("done", "failed")
# What the protocol has done so far, beyond the visible phase: the stages before the rounds
# (the rounds themselves are told by `progress` and the history).
STAGES = ("waiting", "pretraining", "clustering", "clustered", "done")
# How long an upload waits for the reservation of the same participant's previous upload,
# which broke on its side and is being released, before it is refused as a duplicate.
RELEASE_WAIT_S = 2.0


# The coordinator's wait on the state: wait(done, timeout) -> done() at the end.
Wait = Callable[[Callable[[], bool], float | None], bool]
# A round's planner: (active count, selectable groups) -> (selected, evaluators).
Planner = Callable[[int, dict[str, int]], tuple[Mapping[str, int], Iterable[str]]]


class Concluded(NamedTuple):
    """A recorded round (`ClustererState.conclude_round`)."""

    record: RoundRecord
    convicted: list[str]  # by this round
    convicted_total: int  # by the quarantine so far
    failing: list[RoundRecord] | None  # the last rounds, when they all failed


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
    stopped: str = ""


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
        self.experiment: dict[str, Any] = {}  # the settings the stored state belongs to
        self._on_phase = on_phase  # told every phase change (the phase metric)
        self._on_task: TaskListener | None = None  # told who gets a task (`listen`)
        # waiting, pretraining, clustering, selecting, evaluating, training, aggregating,
        # done, failed
        self.phase = ""
        self.enter("waiting")
        self.stage = "waiting"  # one of STAGES
        self.round = -1
        self.model_version = 0
        self.membership = Membership(strategy, max_members)
        self.tasks = TaskBoard(self._told)
        self.collecting: RoundCollection | None = None
        self.progress: RoundProgress | None = None
        self.pretraining = Pretraining(seed)
        self.evaluations = Evaluations()
        self.history: list[RoundRecord] = []
        self.purity: float | None = None
        self.error = ""
        self.stopped = ""  # why training ended before --rounds (the privacy budget)
        self.rng: np.random.Generator | None = None  # the coordinator's plan stream
        self.journal: Journal | None = None  # durability (`attach`)
        self.cond = threading.Condition()

    # ---- the parts, as they were reached before the split -------------------------------
    @property
    def members(self) -> dict[str, Member]:
        return self.membership.members

    @property
    def quarantine(self) -> Quarantine:
        """Who may train after rolled-back rounds."""
        return self.membership.quarantine

    @property
    def centroids(self) -> dict[int, torch.Tensor]:
        return self.pretraining.centroids

    @property
    def store(self) -> ClustererStore | None:
        return self.journal.store if self.journal is not None else None

    @store.setter
    def store(self, store: ClustererStore) -> None:
        self.journal = Journal(store)

    # ---- durability --------------------------------------------------------------------
    def attach(
        self,
        store: ClustererStore,
        rng: np.random.Generator,
        experiment: Mapping[str, Any] | None = None,
    ) -> bool:
        """Persist through store from now on, after restoring what it holds (rng included:
        later rounds draw as they would have); whether there was anything to restore.

        `experiment` (strategy, seed, clustering) is kept with the state: a restart with
        other settings is refused rather than mixing two experiments.
        """
        with self.cond:
            self.journal = Journal(store)
            found = self.journal.open(self, rng, experiment)
            self.cond.notify_all()
            return found

    def _journal(self, event: dict[str, Any]) -> int:
        """Journal an RPC's change (cond held); the record's number, for `_durable`."""
        return self.journal.append(event) if self.journal is not None else 0

    def _durable(self, seq: int) -> None:
        """Wait until journal record seq is on disk, after the cond is released: the RPC
        is acknowledged only then, and concurrent RPCs share one fsync. Whatever the
        coordinator acts on is durable anyway: every phase change writes a snapshot."""
        if self.journal is not None:
            self.journal.durable(seq)

    def _persist(self, export: bool = False, when_due: bool = False) -> None:
        """Snapshot the whole state at a phase change (cond held); export history.json
        (with `when_due`, only if it is cheap enough by now: `ClustererStore.export`)."""
        if self.journal is None:
            return
        self.journal.snapshot(self)
        if export:
            self.journal.export(self, when_due)

    # ---- participants' side (RPC handlers) --------------------------------------------
    def join(self, pid: str, num_train: int, num_test: int, group: int, device: str) -> bool:
        """Admit a participant (idempotent); returns whether it is new.

        A late joiner of a clustered federation gets a pre-training task and joins the
        nearest cluster when its delta arrives; otherwise it takes its static group.
        """
        with self.cond:
            late = self.phase != "waiting"
            member = self.membership.admit(pid, num_train, num_test, group, device, late)
            if member is None:
                return False
            seq = self._journal({"e": "join", "pid": pid, "member": asdict(member)})
            self.membership.add(member)
            if late and self.strategy.clustered:
                self.tasks[pid] = Task(TaskKind.PRETRAIN, -1, 0)
            self.cond.notify_all()
        self._durable(seq)
        return True

    def peek(self, pid: str) -> tuple[Task | None, tuple[TaskKind, int, int]]:
        """pid's task now (NOT_FOUND for a stranger) and the answer for one without a task:
        (kind, round, model version). Read without the cond, so that a long poll never
        waits behind a snapshot's fsync or a journal's group commit: each read is one
        dictionary lookup or attribute, atomic under the GIL; a task given just after the
        read wakes the poll (it registered before it looked), which then reads again."""
        self.membership.touch(pid)
        kind = TaskKind.DONE if self.phase in TERMINAL else TaskKind.WAIT
        return self.tasks.get(pid), (kind, self.round, self.model_version)

    def begin_upload(
        self, pid: str, round_: int, model_version: int, cut: Callable[[], None] | None = None
    ) -> int:
        """Check that pid may upload its update for round_ now; reserve it; its cluster.
        `cut` cancels the upload (the round closes without waiting for it)."""
        with self.cond:
            self.membership.touch(pid)
            # An upload of pid's that broke on its side releases its reservation in a
            # moment (from the server's thread): a retry waits for that, briefly.
            self.cond.wait_for(
                lambda: self.collecting is None or pid not in self.collecting.in_flight,
                timeout=RELEASE_WAIT_S,
            )
            if self.collecting is None:
                raise no_upload_open(round_)
            return self.collecting.reserve(pid, round_, model_version, cut)

    def finish_upload(self, pid: str, round_: int, accepted: bool) -> None:
        """Release the reservation; an accepted update counts (journaled) and ends the
        TRAIN task."""
        seq = 0
        with self.cond:
            open_ = self.collecting
            if open_ is None or not open_.takes(round_):
                return
            open_.release(pid, accepted)
            if accepted:
                seq = self._count_update(open_, pid)
            elif isinstance(open_, AsyncCollection):
                # Refused (too stale, a base the aggregator no longer keeps, a broken
                # stream): the next hand-out gives a task of the newest version.
                self.tasks.withdraw(pid, TaskKind.TRAIN)
            self.cond.notify_all()
        self._durable(seq)

    def _count_update(self, c: RoundCollection, pid: str) -> int:
        """Count pid's update of the collecting round c (journaled) and end its TRAIN task;
        the journal entry's sequence number, to wait for outside the lock (cond held)."""
        seq = self._journal({"e": "update", "pid": pid, "round": c.round})
        c.received.add(pid)
        self.tasks.withdraw(pid, TaskKind.TRAIN)
        return seq

    def check_pretrain_task(self, pid: str) -> None:
        """Raise unless pid has an open pre-training task."""
        with self.cond:
            self.membership.touch(pid)
            if not self.tasks.has(pid, TaskKind.PRETRAIN):
                raise StateError(f"{pid} has no pre-training task")

    def accept_pretrain_delta(self, pid: str, delta: torch.Tensor) -> None:
        """Store a pre-training delta (sketched when long; durable before it counts); a
        late joiner joins a cluster."""
        delta = self.pretraining.sketched(delta)
        # The file is written outside the lock; one whose record never follows is dropped
        # at the next restart.
        journal = self.journal
        name = journal.save_delta(pid, delta) if journal is not None else ""
        with self.cond:
            if not self.tasks.has(pid, TaskKind.PRETRAIN):
                raise StateError(f"{pid}'s pre-training task was withdrawn (too late)")
            member = self.members[pid]
            cluster = self.pretraining.nearest(delta, member.cluster)
            seq = self._journal({"e": "pretrain", "pid": pid, "file": name, "cluster": cluster})
            self.pretraining.add(pid, delta, name)
            member.cluster = cluster
            del self.tasks[pid]
            self.cond.notify_all()
        self._durable(seq)

    def record_evaluation(self, pid: str, tag: str, model_version: int, result: Evaluation) -> None:
        """Count pid's evaluation (journaled) if it answers its open evaluation task."""
        with self.cond:
            self.membership.touch(pid)
            if not self.tasks.has(pid, TaskKind.EVALUATE, tag):
                raise StateError(f"{pid} has no open evaluation {tag[:64]!r}")
            task = self.tasks[pid]
            if model_version != task.model_version:
                raise StateError(
                    f"evaluated version {model_version}, the task asked for {task.model_version}"
                )
            results = self.evaluations.results.get(tag)
            seq = 0
            if results is not None:
                seq = self._journal({"e": "eval", "pid": pid, "tag": tag, **asdict(result)})
                results[pid] = result
            del self.tasks[pid]
            self.cond.notify_all()
        self._durable(seq)

    # ---- the coordinator's side -------------------------------------------------------
    def enter(self, name: str) -> None:
        """Change phase (cond held); the listener hears of it."""
        self.phase = name
        if self._on_phase is not None:
            self._on_phase(name)
        if name in TERMINAL:
            self._told(None)  # no task will come: every waiter answers now

    def listen(self, on_task: TaskListener) -> None:
        """Tell on_task, with the cond held (it must not block), which participants were
        just given a task, or None once the federation is over: what a long poll that read
        `peek` waits for (it does not wait on the cond)."""
        with self.cond:
            self._on_task = on_task

    def _told(self, pids: Iterable[str] | None) -> None:
        if self._on_task is not None:
            self._on_task(pids)

    def set_phase(self, name: str) -> None:
        """Enter a phase and wake the waiters."""
        with self.cond:
            self.enter(name)
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

    def cancel(self, participants: Iterable[str], kind: TaskKind) -> list[str]:
        """Withdraw unfinished tasks of a kind; who had one (a timeout on their record)."""
        with self.cond:
            missed = self.tasks.withdraw_all(participants, kind)
            self.membership.timed_out(missed)
            return missed

    def member_ids(self) -> list[str]:
        """Every member, sorted."""
        with self.cond:
            return sorted(self.members)

    def assign_static_groups(self) -> None:
        """Group every member without clustering (one group, or each its own)."""
        with self.cond:
            self.membership.assign_static_groups()
            self.stage = "clustered"
            self._persist(export=True)

    def start_pretraining(self) -> list[str]:
        """Give every member without a delta a pre-training task (after a restart the
        others keep theirs); every member, whose deltas clustering waits for."""
        with self.cond:
            self.enter("pretraining")
            self.stage = "pretraining"
            members = sorted(self.members)
            have = self.pretraining.deltas
            self.tasks.update({p: Task(TaskKind.PRETRAIN, -1, 0) for p in members if p not in have})
            self._persist()
            self.cond.notify_all()
            return members

    def start_clustering(self) -> None:
        """Pre-training is over: the deltas in are the ones clustered, also after a restart."""
        with self.cond:
            self.enter("clustering")
            self.stage = "clustering"
            self._persist()
            self.cond.notify_all()

    def pretrained(self) -> tuple[list[str], list[torch.Tensor]]:
        """Who sent a pre-training delta, and the deltas, in id order."""
        with self.cond:
            return self.pretraining.in_order()

    def set_clusters(
        self, participants: list[str], assignment: np.ndarray, deltas: torch.Tensor
    ) -> float | None:
        """Record the clustering and its centroids (for late joiners); the purity against
        the ground-truth groups members reported (None when some have none)."""
        with self.cond:
            self.membership.set_clusters(dict(zip(participants, assignment.tolist(), strict=True)))
            self.pretraining.set_centroids(assignment, deltas)
            if self.journal is not None:
                self.pretraining.centroids_file = self.journal.save_centroids(self.centroids)
            truth = np.array([self.members[p].group for p in participants])
            self.purity = purity(assignment, truth) if (truth >= 0).all() else None
            self.stage = "clustered"
            self._persist(export=True)
            return self.purity

    def joined(self) -> int:
        """How many participants joined."""
        with self.cond:
            return len(self.members)

    def has_pretrained(self, participants: Iterable[str]) -> bool:
        """Whether every one of participants sent its pre-training delta."""
        with self.cond:
            return self.pretraining.have(participants)

    def next_round(self) -> int | None:
        """The round to run next by this state's record (None: it has none, e.g. a fresh
        or in-memory clusterer)."""
        with self.cond:
            if self.progress is not None:
                return self.progress.round
            if self.history:
                return self.history[-1].round + 1
            return self.round if self.round >= 0 else None

    def start_round(self, round_: int, liveness_s: float) -> tuple[int, dict[str, int]]:
        """Enter round_: selection comes next. How many members are active (heard from
        within liveness_s or busy with a task), and of them those the round may select
        while rolled-back rounds are being traced to their contributors (quarantine.py)."""
        with self.cond:
            self.round = round_
            self.enter("selecting")
            self.cond.notify_all()
            groups = self.membership.active_groups(liveness_s, self.tasks)
            return len(groups), self.membership.selectable(groups)

    def plan(
        self, round_: int, selected: Mapping[str, int], evaluators: Iterable[str]
    ) -> RoundProgress:
        """Fix round_'s plan. It is saved, with the stream it was drawn from, by the next
        step (the evaluators asked, or the round opened) before anyone is told anything: a
        restart before then plans the round again from the saved stream, and one after
        redoes it with the same selection and draws later rounds alike."""
        with self.cond:
            self.progress = RoundProgress(
                round_, "planned", dict(selected), list(evaluators), time.time()
            )
            return self.progress

    def resume_round(self, round_: int) -> RoundProgress:
        """The restored progress of round_ (the coordinator goes on from its step)."""
        with self.cond:
            if self.progress is None or self.progress.round != round_:
                raise StateError(f"no round {round_} in flight to resume")
            self.round = round_
            return self.progress

    def active_groups(self, liveness_s: float) -> dict[str, int]:
        """Grouped members heard from recently or busy with a task, by id."""
        with self.cond:
            return self.membership.active_groups(liveness_s, self.tasks)

    def true_groups(self) -> dict[str, int]:
        """The ground-truth group each member joined with (-1: none), by id."""
        with self.cond:
            return self.membership.true_groups()

    def cluster_ids(self) -> list[int]:
        """The clusters members are in, ascending."""
        with self.cond:
            return self.membership.cluster_ids()

    def clusters_of(self, participants: Iterable[str]) -> dict[str, int]:
        """The cluster of each of participants."""
        with self.cond:
            return self.membership.clusters_of(participants)

    def asked_for(self, tag: str) -> list[str] | None:
        """Who an evaluation in progress asked (None: it has not started)."""
        with self.cond:
            asked = self.evaluations.asked.get(tag)
            return None if asked is None else list(asked)

    def start_evaluation(self, tag: str, participants: Iterable[str]) -> list[str]:
        """Ask participants to evaluate the current model; the ones asked. Results already
        in (before a restart) count: only the others are asked again."""
        with self.cond:
            self.enter("evaluating")
            asked, rest = self.evaluations.start(tag, participants)
            # Saved before the tasks exist: polls read them without the lock.
            self._persist()
            self.tasks.update(
                {p: Task(TaskKind.EVALUATE, self.round, self.model_version, tag) for p in rest}
            )
            self.cond.notify_all()
            return asked

    def evaluated(self, tag: str, participants: Iterable[str]) -> bool:
        """Whether every one of participants reported (call inside wait_until)."""
        return self.evaluations.done(tag, participants)

    def close_evaluation(
        self, tag: str, asked: Iterable[str]
    ) -> tuple[dict[str, Evaluation], list[str]]:
        """Close an evaluation: the results that came in (a restart before the next
        snapshot replays them from the journal), and who of asked missed it (their
        tasks withdrawn, a timeout on their record)."""
        with self.cond:
            missed = self.tasks.withdraw_all(asked, TaskKind.EVALUATE)
            self.membership.timed_out(missed)
            return self.evaluations.finish(tag), missed

    def open_round(
        self, round_: int, cluster_accuracy: Mapping[int, float], enough: int | None = None
    ) -> None:
        """Start collecting round_'s updates from the planned participants (over-selected:
        the round closes at the first `enough`)."""
        with self.cond:
            p = self._progress(round_)
            p.step = "training"
            p.cluster_accuracy = dict(cluster_accuracy)
            p.base_version = self.model_version
            self.enter("training")
            self.collecting = RoundCollection(
                round_, self.model_version, dict(p.selected), enough=enough
            )
            self._persist()  # before the tasks exist: polls read them without the lock
            self.tasks.update(
                {q: Task(TaskKind.TRAIN, round_, self.model_version) for q in p.selected}
            )
            self.cond.notify_all()

    # ---- --mode async (services/clusterer/buffering.py drives these) -------------------
    def open_buffers(self, round_: int, buffered: Mapping[str, int]) -> None:
        """Start taking uploads at any time: `buffered` (participant -> cluster) are the
        updates the aggregator holds in its buffers now."""
        with self.cond:
            self.round = round_
            self.enter("training")
            self.collecting = AsyncCollection(
                round_,
                self.model_version,
                dict(buffered),
                set(buffered),
                board=self.tasks,
            )
            self.cond.notify_all()

    def hand_out(
        self,
        step: int,
        liveness_s: float,
        oldest: int,
        owing: Container[str],
        task_round: int | None = None,
    ) -> tuple[int, int]:
        """Give every active member that has no task, no update in a buffer and owes no
        evaluation a TRAIN task of the newest version; replace TRAIN tasks older than
        `oldest` (their updates would be refused as too stale); a task's round is
        `task_round` (its learning rate's), else `step`. (handed out, replaced)."""
        with self.cond:
            c = self.collecting
            if not isinstance(c, AsyncCollection):
                raise StateError("no asynchronous collection is open")
            c.round = step
            c.model_version = self.model_version
            self.round = step
            groups = self.membership.active_groups(liveness_s, self.tasks)
            given: dict[str, Task] = {}
            replaced = 0
            for p, cluster in groups.items():
                c.selected[p] = cluster
                if p in c.received or p in c.in_flight or p in owing:
                    continue
                task = self.tasks.get(p)
                if task is not None and task.kind == TaskKind.TRAIN and task.model_version < oldest:
                    replaced += 1
                    task = None
                if task is None:
                    given[p] = Task(
                        TaskKind.TRAIN,
                        step if task_round is None else task_round,
                        self.model_version,
                    )
            if given:
                self.tasks.update(given)
                self.cond.notify_all()
            return len(given) - replaced, replaced

    def buffered(self) -> dict[int, int]:
        """--mode async: updates waiting in the aggregator's buffers, per cluster."""
        with self.cond:
            c = self.collecting
            return c.buffered() if isinstance(c, AsyncCollection) else {}

    def flushed(self, merged: Iterable[str]) -> None:
        """--mode async: the aggregator took these updates out of its buffers; their
        senders may train again."""
        with self.cond:
            c = self.collecting
            if isinstance(c, AsyncCollection):
                c.received -= set(merged)
            self.cond.notify_all()

    def ask_when_free(self, tag: str, version: int, participants: Iterable[str]) -> list[str]:
        """--mode async: have participants evaluate `version` as soon as each is between
        tasks (an evaluation never cuts a training task short); who still owes it."""
        with self.cond:
            if tag not in self.evaluations.asked:
                self.evaluations.start(tag, participants)
            results = self.evaluations.results.get(tag, {})
            owing = [p for p in self.evaluations.asked[tag] if p not in results]
            free = {
                p: Task(TaskKind.EVALUATE, self.round, version, tag)
                for p in owing
                if self.tasks.get(p) is None
            }
            if free:
                self.tasks.update(free)
                self.cond.notify_all()
            return owing

    def reopen_round(
        self, round_: int, acknowledged: Iterable[str], enough: int | None = None
    ) -> list[str]:
        """After a restart: count what the aggregator acknowledged, hand TRAIN tasks again
        to the selected participants not yet in; who they are."""
        with self.cond:
            p = self._progress(round_)
            c = self.collecting
            if c is None or c.round != round_:
                c = RoundCollection(round_, self.model_version, dict(p.selected), enough=enough)
                self.collecting = c
            c.received |= set(acknowledged) & set(c.selected)
            self.enter("training")
            rest = c.unheard(c.selected)
            self.tasks.update({q: Task(TaskKind.TRAIN, round_, c.model_version) for q in rest})
            self._persist()
            self.cond.notify_all()
            return rest

    def acknowledge(self, round_: int, participants: Iterable[str]) -> None:
        """Count updates of round_ the aggregator holds that this clusterer did not hear
        were accepted (journaled; their TRAIN tasks end)."""
        seq = 0
        with self.cond:
            c = self.collecting
            if c is None or c.round != round_ or c.closed:
                return
            for q in c.unheard(participants):
                seq = self._count_update(c, q)
            self.cond.notify_all()
        self._durable(seq)

    def _progress(self, round_: int) -> RoundProgress:
        """The round in flight, which must be round_ (cond held)."""
        if self.progress is None or self.progress.round != round_:
            raise StateError(f"round {round_} is not the round in flight")
        return self.progress

    def all_received(self) -> bool:
        """Whether every selected participant's update is in (call inside wait_until)."""
        c = self.collecting
        return c is not None and c.all_received()

    def stop_collecting(self) -> None:
        """The deadline passed or all are in: no new upload may begin; those streaming
        finish (wait for `uploads_settled`)."""
        with self.cond:
            if self.collecting is not None:
                self.collecting.closed = True

    def cut_uploads(self) -> int:
        """Cancel the uploads still streaming after the grace a closed round gives them (a
        sender dripping bytes cannot hold the round open); how many were cut."""
        with self.cond:
            c = self.collecting
            cutters = list(c.cutters.values()) if c is not None else []
        for cut in cutters:
            cut()
        return len(cutters)

    def uploads_settled(self) -> bool:
        """Whether no upload is streaming any more (call inside wait_until)."""
        c = self.collecting
        return c is None or not c.in_flight

    def close_round(self, acknowledged: Iterable[str], needed: int) -> RoundProgress:
        """Stop collecting: what came in (with what the aggregator acknowledged that this
        clusterer did not hear of), who was too late (tasks withdrawn), and whether the
        round has too few updates (under `needed`) and is abandoned. Durable before
        Aggregate is called."""
        with self.cond:
            c = self.collecting
            p = self._progress(c.round if c is not None else self.round)
            self.collecting = None
            self.enter("aggregating")
            received = set() if c is None else c.received
            received |= set(acknowledged) & set(p.selected)
            late = [
                q
                for q in p.selected
                if self.tasks.withdraw(q, TaskKind.TRAIN) and q not in received
            ]
            self.membership.timed_out(late)
            p.received = sorted(received)
            p.timed_out = late
            p.abandon = len(received) < needed
            if c is not None:
                p.phases["upload"] = c.longest_upload_s
            p.step = "aggregating"
            self._persist()
            self.cond.notify_all()
            return p

    def aggregated(self, round_: int, reply: dict[str, Any]) -> None:
        """The aggregator answered round_'s Aggregate: kept, and saved by the next step
        (the new model's evaluation asked) so that it is not asked again; a restart
        before then asks again and gets the same answer (Aggregate is idempotent)."""
        with self.cond:
            p = self._progress(round_)
            p.reply = reply
            p.step = "aggregated"

    def judged(self, round_: int, judgement: Judgement) -> None:
        """The evaluators refused round_'s version: saved at once, before Rollback is
        asked for (a restart goes straight to the rollback)."""
        with self.cond:
            self._progress(round_).judgement = judgement
            self._persist()

    def rolled_back(self, round_: int, reply: dict[str, Any]) -> None:
        """The aggregator answered round_'s Rollback: kept with the round, saved at once
        (a restart finds it and does not ask again; if it did, the answer is the same)."""
        with self.cond:
            p = self._progress(round_)
            p.rollback = reply
            self._persist()

    def phase_took(self, round_: int, phase: str, seconds: float) -> None:
        """Note how long a phase of round_ took (kept with the round, saved with its next
        step, reported in its history entry)."""
        with self.cond:
            self._progress(round_).phases[phase] = seconds

    def set_model_version(self, version: int) -> None:
        """The global model version participants work from now."""
        with self.cond:
            self.model_version = max(self.model_version, version)

    def record_round(self, record: RoundRecord) -> tuple[RoundRecord, list[str]]:
        """Append a finished round to the history; the round in flight is done. What its
        contributors did (a good or a rolled-back model) goes to the quarantine; the
        record as kept (with whom that convicted) and who that convicted."""
        with self.cond:
            convicted: list[str] = []
            p = self.progress
            if p is not None and p.round == record.round and not p.abandon:
                convicted = self.quarantine.record(p.shaped(), record.failed)
                record = replace(record, convicted=convicted)
            if self.journal is not None:
                self.journal.append_round(record)
            self.history.append(record)
            self.progress = None
            self._persist(export=True, when_due=True)
            self.cond.notify_all()
            return record, convicted

    def finish(self, rounds: int, stopped: str = "") -> None:
        """The federation is done: every member's next task is DONE (`stopped`: why before
        --rounds)."""
        with self.cond:
            self.stopped = stopped
            self.enter("done")
            self.stage = "done"
            # One update, one listener call: enter("done") has woken every poll already.
            done = Task(TaskKind.DONE, rounds, self.model_version)
            self.tasks.update(dict.fromkeys(self.members, done))
            self._persist(export=True)
            self.cond.notify_all()

    def fail(self, error: str) -> None:
        """The federation failed; the service stays up to report it. Not persisted: a
        restart tries again from the last good phase."""
        with self.cond:
            self.enter("failed")
            self.error = error
            self.cond.notify_all()

    # ---- the coordinator's transitions ---------------------------------------------------
    # Each runs, in the protocol's order, the fine-grained steps above that the coordinator
    # performs in sequence; every step takes the cond as it does alone. `wait` is the
    # coordinator's wait on this state (it ends the protocol when the service stops); the
    # callables the coordinator passes do its part (asking the aggregator, metrics, logs)
    # where the protocol needs it between two steps.
    def gather(self, participants: int, wait: Wait) -> int:
        """Wait for `participants` members to join (no deadline); how many joined."""
        self.set_phase("waiting")
        wait(lambda: self.joined() >= participants, None)
        return self.joined()

    def pretrain(self, wait: Wait, timeout: float | None) -> tuple[list[str], list[str]]:
        """Hand out the pre-training tasks and wait for the deltas until timeout; every
        member asked, and those who missed it (their tasks withdrawn)."""
        members = self.start_pretraining()
        wait(lambda: self.has_pretrained(members), timeout)
        return members, self.cancel(members, TaskKind.PRETRAIN)

    def begin_clustering(self) -> tuple[list[str], list[torch.Tensor]]:
        """Pre-training is over; who sent a delta, and the deltas, in id order."""
        self.start_clustering()
        return self.pretrained()

    def next_step(self) -> tuple[int, str] | None:
        """The round to run next by this state's record and the step it is at (None: no
        record, e.g. a fresh or in-memory clusterer)."""
        mine = self.next_round()
        if mine is None:
            return None
        p = self.progress
        return mine, p.step if p is not None else "planned"

    def begin_round(
        self, round_: int, liveness_s: float, planner: Planner
    ) -> tuple[RoundProgress, bool]:
        """Round round_'s progress and whether it was resumed: the restored one when it is
        in flight, or else a new round entered (`start_round`) and planned by
        planner(active count, selectable groups) -> (selected, evaluators) (`plan`)."""
        p = self.progress
        if p is not None and p.round == round_:
            return self.resume_round(round_), True
        active, groups = self.start_round(round_, liveness_s)
        selected, evaluators = planner(active, groups)
        return self.plan(round_, selected, evaluators), False

    def evaluators(
        self, tag: str, liveness_s: float, sample: Callable[[dict[str, int]], list[str]]
    ) -> list[str]:
        """Who evaluation tag asks: those it asked already (after a restart), or else
        sample(the active members' groups)."""
        asked = self.asked_for(tag)
        if asked is None:
            asked = sample(self.active_groups(liveness_s))
        return asked

    def evaluate(
        self, tag: str, participants: Iterable[str], wait: Wait, timeout: float | None
    ) -> tuple[dict[str, Evaluation], list[str]]:
        """Have participants evaluate the current model and wait for all or the timeout;
        the results, and who missed it (`close_evaluation`)."""
        asked = self.start_evaluation(tag, participants)
        wait(lambda: self.evaluated(tag, asked), timeout)
        return self.close_evaluation(tag, asked)

    def collect(
        self,
        round_: int,
        wait: Wait,
        timeout_s: float,
        peek_s: float,
        peek: Callable[[], Iterable[str]],
    ) -> None:
        """Collect round_'s updates until all selected answered or timeout_s passed; every
        peek_s, count what peek() says the aggregator holds (`acknowledge`). Then no new
        upload may begin (`stop_collecting`)."""
        deadline = time.monotonic() + timeout_s
        while not wait(self.all_received, min(peek_s, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                break
            self.acknowledge(round_, peek())
        self.stop_collecting()

    def settle_uploads(
        self, wait: Wait, idle_s: float, cut_wait_s: float, on_cut: Callable[[int], None]
    ) -> None:
        """Wait up to idle_s for the uploads under way to finish; past that, cut them
        (on_cut hears how many) and wait up to cut_wait_s for their reservations."""
        if not wait(self.uploads_settled, idle_s):
            on_cut(self.cut_uploads())
            wait(self.uploads_settled, cut_wait_s)

    def roll_back(
        self, round_: int, judgement: Judgement | None, ask: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """Roll round_ back: save judgement first when given (`judged`), then, unless the
        round has the aggregator's answer already, ask() for it and save it
        (`rolled_back`); the answer, and whether it was asked for now."""
        if judgement is not None:
            self.judged(round_, judgement)
        p = self.progress  # read as the coordinator read its own copy, without the cond
        answer = p.rollback if p is not None and p.round == round_ else None
        if answer is not None:
            return answer, False
        answer = ask()
        self.rolled_back(round_, answer)
        return answer, True

    def conclude_round(self, record: RoundRecord, max_failed: int) -> Concluded:
        """Record a finished round (`record_round`); with who it convicted, how many the
        quarantine holds convicted, and the last max_failed rounds when they all failed."""
        record, convicted = self.record_round(record)
        # Read without the cond, as before: only the coordinator changes these.
        total = len(self.quarantine.convicted)
        last = self.history[-max_failed:]
        failing = last if len(last) == max_failed and all(h.failed for h in last) else None
        return Concluded(record, convicted, total, failing)

    def privacy_steps(self) -> list[Step]:
        """The privacy ledger's steps: one per finished round the mechanism ran in (the
        history is durable, so the ledger survives a restart with it)."""
        with self.cond:
            return [
                Step(h.dp_noise, h.dp_rate)
                for h in self.history
                if h.dp_noise is not None and h.dp_rate is not None
            ]

    def view(self, members: slice = slice(None), rounds: slice = slice(None)) -> StatusView:
        """What GetStatus reports (a page of the members, in id order, and of the rounds),
        copied under the lock."""
        with self.cond:
            ids = sorted(self.members)[members]
            return StatusView(
                self.phase,
                self.round,
                self.model_version,
                [h.to_dict() for h in self.history[rounds]],
                [(p, self.members[p].cluster, self.members[p].group) for p in ids],
                self.purity,
                self.error,
                len(self.members),
                len(self.history),
                self.stopped,
            )
