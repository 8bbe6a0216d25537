"""The clusterer's state and its rules, in one place, under one condition variable.

Who may join and how a late joiner is grouped, which task a participant has, whether an
upload may begin and what finishing it means, which evaluations count: all of it is a
method here, as AggregatorState is for the aggregator. RPC handlers call these methods and
pack the answers; the coordinator thread drives the phases through them and waits on
`cond`, which every change notifies.

With a store (`attach`), every change is durable before it is acknowledged: RPC-driven
changes (a join, a pre-training delta, an evaluation, an accepted update) are journaled,
and every phase change writes a snapshot of the whole state, the round in flight
included (its plan, what came in, the aggregator's answer), so a restarted clusterer
goes on where the killed one stopped (services/clusterer/store.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from services.clusterer.store import ClustererStore
from services.common.figures import purity
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.core.errors import CapacityError, ConfigError, NotFoundError, StateError
from services.core.plan import static_group
from services.core.quarantine import Judgement, Quarantine
from services.core.sketch import SKETCH_ABOVE, SKETCH_DIM, count_sketch
from services.core.strategies import Strategy

logger = logging.getLogger(__name__)

TERMINAL = ("done", "failed")
# What the protocol has done so far, beyond the visible phase: the stages before the rounds
# (the rounds themselves are told by `progress` and the history).
STAGES = ("waiting", "pretraining", "clustering", "clustered", "done")
# The steps of the round in flight: planned (pre-round evaluation next), training,
# aggregating (Aggregate may have been called), aggregated (post-round evaluation next).
STEPS = ("planned", "training", "aggregating", "aggregated")
# How long an upload waits for the reservation of the same participant's previous upload,
# which broke on its side and is being released, before it is refused as a duplicate.
RELEASE_WAIT_S = 2.0


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """'key: old -> new' for every setting that differs, in key order."""
    keys = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
    return ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys)


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


# Told, with the cond held, who was just given a task (None: everyone, the federation ended).
TaskListener = Callable[[Iterable[str] | None], None]


class _TaskBoard(dict[str, Task]):
    """The open tasks by participant: a dict whose item assignment and update tell `told`
    who gets one, so waiters that do not block on the cond (the clusterer's asyncio long
    polls) wake."""

    def __init__(self, told: TaskListener) -> None:
        super().__init__()
        self._told = told

    def __setitem__(self, pid: str, task: Task) -> None:
        super().__setitem__(pid, task)
        self._told((pid,))

    def update(self, tasks: Mapping[str, Task]) -> None:  # type: ignore[override]
        super().update(tasks)
        self._told(tasks.keys())


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
        self.experiment: dict[str, Any] = {}  # the settings the stored state belongs to
        self.max_members = max_members
        self._on_phase = on_phase  # told every phase change (the phase metric)
        self._on_task: TaskListener | None = None  # told who gets a task (`listen`)
        # waiting, pretraining, clustering, selecting, evaluating, training, aggregating,
        # done, failed
        self.phase = ""
        self._enter("waiting")
        self.stage = "waiting"  # one of STAGES
        self.round = -1
        self.model_version = 0
        self.members: dict[str, Member] = {}
        self.tasks: dict[str, Task] = _TaskBoard(self._told)
        self.collecting: RoundCollection | None = None
        self.progress: RoundProgress | None = None
        self.pretrain_deltas: dict[str, torch.Tensor] = {}
        self.delta_files: dict[str, str] = {}  # participant -> its stored delta
        self.centroids: dict[int, torch.Tensor] = {}
        self.centroids_file: str | None = None  # where the store keeps them
        self.evaluations: dict[str, dict[str, Evaluation]] = {}
        self.asked: dict[str, list[str]] = {}  # evaluation tag -> who was asked
        self.history: list[dict[str, Any]] = []
        self.purity: float | None = None
        self.error = ""
        self.rng: np.random.Generator | None = None  # the coordinator's plan stream
        self.quarantine = Quarantine()  # who may train after rolled-back rounds
        self.store: ClustererStore | None = None
        self.cond = threading.Condition()

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
            self.rng = rng
            self.store = store
            self.experiment = dict(experiment or {})
            found = store.load()
            if found is not None:
                kept = (found.snapshot or {}).get("experiment")
                if kept is not None and kept != self.experiment:
                    raise ConfigError(
                        f"{store.directory} holds the state of another experiment "
                        f"({changes(kept, self.experiment)}): start with the same settings, "
                        "or with an empty --state-dir"
                    )
                if found.snapshot is not None:
                    self._restore(found.snapshot)
                for event in found.events:
                    self._replay(event)
                self._after_restore()
            store.drop_deltas(set(self.delta_files.values()))
            if self.centroids and self.centroids_file is None:  # a snapshot kept them inline
                self.centroids_file = store.save_centroids(self.centroids)
            self._persist()  # the journal (and any torn tail) is folded into a snapshot
            store.drop_centroids(self.centroids_file)
            self.cond.notify_all()
            return found is not None

    def _journal(self, event: dict[str, Any]) -> int:
        """Journal an RPC's change (cond held); the record's number, for `_durable`."""
        return self.store.append(event) if self.store is not None else 0

    def _durable(self, seq: int) -> None:
        """Wait until journal record seq is on disk, after the cond is released: the RPC
        is acknowledged only then, and concurrent RPCs share one fsync. Whatever the
        coordinator acts on is durable anyway: every phase change writes a snapshot."""
        if seq:  # _journal numbers records only when there is a store
            self.store.sync(seq)  # type: ignore[union-attr]

    def _persist(self, export: bool = False, when_due: bool = False) -> None:
        """Snapshot the whole state at a phase change (cond held); export history.json
        (with `when_due`, only if it is cheap enough by now: `ClustererStore.export`)."""
        if self.store is None:
            return
        self.store.snapshot(self._data())
        if export:
            self.store.export(self._export, when_due)

    def _data(self) -> dict[str, Any]:
        """Everything a restart needs, JSON-able (cond held)."""
        c = self.collecting
        return {
            "experiment": self.experiment,
            "stage": self.stage,
            "phase": self.phase,
            "round": self.round,
            "model_version": self.model_version,
            "members": {p: vars(m) for p, m in self.members.items()},
            "deltas": dict(self.delta_files),
            "centroids_file": self.centroids_file,
            "purity": self.purity,
            "rng": self.rng.bit_generator.state if self.rng is not None else None,
            "progress": asdict(self.progress) if self.progress is not None else None,
            "collecting": None
            if c is None
            else {
                "round": c.round,
                "model_version": c.model_version,
                "selected": c.selected,
                "received": sorted(c.received),
            },
            "evaluations": {
                tag: {
                    "asked": self.asked.get(tag, []),
                    "results": {p: vars(e) for p, e in got.items()},
                }
                for tag, got in self.evaluations.items()
            },
            "rounds": len(self.history),  # the records are in the store's rounds.jsonl
            "quarantine": self.quarantine.to_json(),
        }

    def _restore(self, data: dict[str, Any]) -> None:
        """Load a snapshot (cond held)."""
        assert self.store is not None
        self.stage = data["stage"]
        self._enter(data["phase"])
        self.round = int(data["round"])
        self.model_version = int(data["model_version"])
        self.members = {p: _member(m) for p, m in data["members"].items()}
        self.delta_files = dict(data["deltas"])
        self.pretrain_deltas = {p: self.store.load_delta(f) for p, f in self.delta_files.items()}
        self.centroids_file = data.get("centroids_file")
        if self.centroids_file:
            self.centroids = self.store.load_centroids(self.centroids_file)
        else:  # snapshots before the centroids had their own file held them as JSON
            inline = data.get("centroids", {})
            self.centroids = {int(k): _tensor_of(v) for k, v in inline.items()}
        self.purity = data["purity"]
        self.quarantine = Quarantine.from_json(data.get("quarantine"))
        if data["rng"] is not None and self.rng is not None:
            self.rng.bit_generator.state = data["rng"]
        p = data["progress"]
        self.progress = None if p is None else _progress(p)
        c = data["collecting"]
        self.collecting = (
            None
            if c is None
            else RoundCollection(
                int(c["round"]), int(c["model_version"]), dict(c["selected"]), set(c["received"])
            )
        )
        self.evaluations, self.asked = {}, {}
        for tag, ev in data["evaluations"].items():
            self.asked[tag] = list(ev["asked"])
            self.evaluations[tag] = {p: Evaluation(**e) for p, e in ev["results"].items()}
        if "history" in data:  # a snapshot written before rounds.jsonl: move it there
            self.history = [_round_record(h) for h in data["history"]]
            self.store.rewrite_rounds(data["history"])
        else:
            self.history = [_round_record(h) for h in self.store.load_rounds(data["rounds"])]

    def _replay(self, event: dict[str, Any]) -> None:
        """Apply one journal record on top of the snapshot (cond held; records are
        idempotent, so one replayed twice changes nothing)."""
        assert self.store is not None
        kind, pid = event["e"], event["pid"]
        if kind == "join":
            self.members.setdefault(pid, _member(event["member"]))
        elif kind == "pretrain":
            self.pretrain_deltas[pid] = self.store.load_delta(event["file"])
            self.delta_files[pid] = event["file"]
            if pid in self.members:
                self.members[pid].cluster = int(event["cluster"])
        elif kind == "eval":
            results = self.evaluations.get(event["tag"])
            if results is not None:
                results[pid] = Evaluation(
                    event["accuracy"],
                    event["loss"],
                    event["examples"],
                    event.get("personal_accuracy"),
                    event.get("personal_loss"),
                    str(event.get("verdict", "ok")),
                    str(event.get("reason", "")),
                )
        elif kind == "update":
            c = self.collecting
            if c is not None and c.round == int(event["round"]):
                c.received.add(pid)

    def _after_restore(self) -> None:
        """What a restored state needs before anyone asks (cond held): everyone counts as
        just heard from, and a member that joined after clustering and has no delta yet
        gets its pre-training task again (tasks are handed out anew, not stored)."""
        now = time.monotonic()
        for m in self.members.values():
            m.last_seen = now
        if self.strategy.clustered and self.stage in ("clustered", "done"):
            for p, m in self.members.items():
                if m.cluster < 0 and p not in self.pretrain_deltas:
                    self.tasks[p] = Task(pb.TASK_KIND_PRETRAIN, -1, 0)
        logger.info(
            "restored %d members, stage %s, round %d (%s), %d rounds done",
            len(self.members),
            self.stage,
            self.round,
            self.progress.step if self.progress else "-",
            len(self.history),
        )

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
            late = self.phase != "waiting"
            if late and not self.strategy.clustered:
                member.cluster = static_group(self.strategy, len(self.members)) or 0
            seq = self._journal({"e": "join", "pid": pid, "member": asdict(member)})
            self.members[pid] = member
            if late and self.strategy.clustered:
                self.tasks[pid] = Task(pb.TASK_KIND_PRETRAIN, -1, 0)
            self.cond.notify_all()
        self._durable(seq)
        return True

    def _member(self, pid: str) -> Member:
        m = self.members.get(pid)
        if m is None:
            raise NotFoundError(f"unknown participant {pid[:64]!r}: call Join first")
        m.last_seen = time.monotonic()
        return m

    def peek(self, pid: str) -> tuple[Task | None, tuple[int, int, int]]:
        """pid's task now (NOT_FOUND for a stranger) and the answer for one without a task:
        (kind, round, model version). Read without the cond, so that a long poll never
        waits behind a snapshot's fsync or a journal's group commit: each read is one
        dictionary lookup or attribute, atomic under the GIL; a task given just after the
        read wakes the poll (it registered before it looked), which then reads again."""
        self._member(pid)
        kind = pb.TASK_KIND_DONE if self.phase in TERMINAL else pb.TASK_KIND_WAIT
        return self.tasks.get(pid), (kind, self.round, self.model_version)

    def begin_upload(
        self, pid: str, round_: int, model_version: int, cut: Callable[[], None] | None = None
    ) -> int:
        """Check that pid may upload its update for round_ now; reserve it; its cluster.
        `cut` cancels the upload (the round closes without waiting for it)."""
        with self.cond:
            self._member(pid)
            # An upload of pid's that broke on its side releases its reservation in a
            # moment (from the server's thread): a retry waits for that, briefly.
            self.cond.wait_for(
                lambda: self.collecting is None or pid not in self.collecting.in_flight,
                timeout=RELEASE_WAIT_S,
            )
            open_ = self.collecting
            if open_ is not None and (pid in open_.received or pid in open_.in_flight):
                raise StateError(
                    f"duplicate submission: {pid} already sent its update for round {round_}"
                )
            if open_ is None or round_ != open_.round or open_.closed:
                now = "no round is open" if open_ is None else f"the open round is {open_.round}"
                if open_ is not None and open_.closed:
                    now = f"round {open_.round} is past its deadline"
                raise StateError(f"round {round_} does not take updates now ({now})")
            if pid not in open_.selected:
                raise StateError(f"{pid[:64]} was not selected in round {open_.round}")
            if model_version != open_.model_version:
                raise StateError(
                    f"trained from model version {model_version}, "
                    f"round {open_.round} uses {open_.model_version}"
                )
            open_.in_flight.add(pid)
            open_.began[pid] = time.monotonic()
            if cut is not None:
                open_.cutters[pid] = cut
            return open_.selected[pid]

    def finish_upload(self, pid: str, round_: int, accepted: bool) -> None:
        """Release the reservation; an accepted update counts (journaled) and ends the
        TRAIN task."""
        seq = 0
        with self.cond:
            open_ = self.collecting
            if open_ is None or open_.round != round_:
                return
            open_.in_flight.discard(pid)
            open_.cutters.pop(pid, None)
            began = open_.began.pop(pid, None)
            if accepted:
                if began is not None:
                    took = time.monotonic() - began
                    open_.longest_upload_s = max(open_.longest_upload_s, took)
                seq = self._journal({"e": "update", "pid": pid, "round": round_})
                open_.received.add(pid)
                task = self.tasks.get(pid)
                if task is not None and task.kind == pb.TASK_KIND_TRAIN:
                    del self.tasks[pid]
            self.cond.notify_all()
        self._durable(seq)

    def check_pretrain_task(self, pid: str) -> None:
        """Raise unless pid has an open pre-training task."""
        with self.cond:
            self._member(pid)
            task = self.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_PRETRAIN:
                raise StateError(f"{pid} has no pre-training task")

    def accept_pretrain_delta(self, pid: str, delta: torch.Tensor) -> None:
        """Store a pre-training delta (sketched when long; durable before it counts); a
        late joiner joins a cluster."""
        if delta.numel() > SKETCH_ABOVE:
            delta = count_sketch(delta.unsqueeze(0), SKETCH_DIM, self.seed)[0]
        # The file is written outside the lock; one whose record never follows is dropped
        # at the next restart.
        store = self.store
        name = store.save_delta(pid, delta) if store is not None else ""
        with self.cond:
            task = self.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_PRETRAIN:
                raise StateError(f"{pid}'s pre-training task was withdrawn (too late)")
            member = self.members[pid]
            cluster = member.cluster
            fit = bool(torch.isfinite(delta.double().norm()))
            if self.centroids and cluster < 0 and fit:
                dist = {c: float((delta - v).norm()) for c, v in self.centroids.items()}
                cluster = min(dist, key=dist.__getitem__)
            seq = self._journal({"e": "pretrain", "pid": pid, "file": name, "cluster": cluster})
            self.pretrain_deltas[pid] = delta
            if name:
                self.delta_files[pid] = name
            member.cluster = cluster
            del self.tasks[pid]
            self.cond.notify_all()
        self._durable(seq)

    def record_evaluation(self, pid: str, tag: str, model_version: int, result: Evaluation) -> None:
        """Count pid's evaluation (journaled) if it answers its open evaluation task."""
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
            seq = 0
            if results is not None:
                seq = self._journal({"e": "eval", "pid": pid, "tag": tag, **asdict(result)})
                results[pid] = result
            del self.tasks[pid]
            self.cond.notify_all()
        self._durable(seq)

    # ---- the coordinator's side -------------------------------------------------------
    def _enter(self, name: str) -> None:
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
            self.stage = "clustered"
            self._persist(export=True)

    def start_pretraining(self) -> list[str]:
        """Give every member without a delta a pre-training task (after a restart the
        others keep theirs); every member, whose deltas clustering waits for."""
        with self.cond:
            self._enter("pretraining")
            self.stage = "pretraining"
            members = sorted(self.members)
            self.tasks.update(
                {
                    p: Task(pb.TASK_KIND_PRETRAIN, -1, 0)
                    for p in members
                    if p not in self.pretrain_deltas
                }
            )
            self._persist()
            self.cond.notify_all()
            return members

    def start_clustering(self) -> None:
        """Pre-training is over: the deltas in are the ones clustered, also after a restart."""
        with self.cond:
            self._enter("clustering")
            self.stage = "clustering"
            self._persist()
            self.cond.notify_all()

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
            if self.store is not None:
                self.centroids_file = self.store.save_centroids(self.centroids)
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
            return all(p in self.pretrain_deltas for p in participants)

    def next_round(self) -> int | None:
        """The round to run next by this state's record (None: it has none, e.g. a fresh
        or in-memory clusterer)."""
        with self.cond:
            if self.progress is not None:
                return self.progress.round
            if self.history:
                return int(self.history[-1]["round"]) + 1
            return self.round if self.round >= 0 else None

    def start_round(self, round_: int) -> None:
        """Enter round_: selection comes next."""
        with self.cond:
            self.round = round_
            self._enter("selecting")
            self.cond.notify_all()

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
        now = time.monotonic()
        with self.cond:
            convicted = self.quarantine.convicted
            return {
                p: m.cluster
                for p, m in sorted(self.members.items())
                if m.cluster >= 0
                and p not in convicted
                and (now - m.last_seen <= liveness_s or p in self.tasks)
            }

    def selectable(self, groups: Mapping[str, int]) -> dict[str, int]:
        """Of active members, those a round may select while rolled-back rounds are being
        traced to their contributors (quarantine.py): all of them when none is suspected."""
        with self.cond:
            allowed = set(self.quarantine.eligible(groups))
        return {p: c for p, c in groups.items() if p in allowed}

    def true_groups(self) -> dict[str, int]:
        """The ground-truth group each member joined with (-1: none), by id."""
        with self.cond:
            return {p: m.group for p, m in self.members.items()}

    def cluster_ids(self) -> list[int]:
        """The clusters members are in, ascending."""
        with self.cond:
            return sorted({m.cluster for m in self.members.values() if m.cluster >= 0})

    def clusters_of(self, participants: Iterable[str]) -> dict[str, int]:
        """The cluster of each of participants."""
        with self.cond:
            return {p: self.members[p].cluster for p in participants if p in self.members}

    def asked_for(self, tag: str) -> list[str] | None:
        """Who an evaluation in progress asked (None: it has not started)."""
        with self.cond:
            asked = self.asked.get(tag)
            return None if asked is None else list(asked)

    def start_evaluation(self, tag: str, participants: Iterable[str]) -> list[str]:
        """Ask participants to evaluate the current model; the ones asked. Results already
        in (before a restart) count: only the others are asked again."""
        with self.cond:
            self._enter("evaluating")
            asked = sorted(participants)
            got = self.evaluations.setdefault(tag, {})
            self.asked[tag] = asked
            # Saved before the tasks exist: polls read them without the lock.
            self._persist()
            self.tasks.update(
                {
                    p: Task(pb.TASK_KIND_EVALUATE, self.round, self.model_version, tag)
                    for p in asked
                    if p not in got
                }
            )
            self.cond.notify_all()
            return asked

    def evaluated(self, tag: str, participants: Iterable[str]) -> bool:
        """Whether every one of participants reported (call inside wait_until)."""
        got = self.evaluations.get(tag, {})
        return all(p in got for p in participants)

    def finish_evaluation(self, tag: str) -> dict[str, Evaluation]:
        """Close an evaluation; the results that came in (a restart before the next
        snapshot replays them from the journal)."""
        with self.cond:
            self.asked.pop(tag, None)
            return dict(self.evaluations.pop(tag, {}))

    def open_round(self, round_: int, cluster_accuracy: Mapping[int, float]) -> None:
        """Start collecting round_'s updates from the planned participants."""
        with self.cond:
            p = self._progress(round_)
            p.step = "training"
            p.cluster_accuracy = dict(cluster_accuracy)
            p.base_version = self.model_version
            self._enter("training")
            self.collecting = RoundCollection(round_, self.model_version, dict(p.selected))
            self._persist()  # before the tasks exist: polls read them without the lock
            self.tasks.update(
                {q: Task(pb.TASK_KIND_TRAIN, round_, self.model_version) for q in p.selected}
            )
            self.cond.notify_all()

    def reopen_round(self, round_: int, acknowledged: Iterable[str]) -> list[str]:
        """After a restart: count what the aggregator acknowledged, hand TRAIN tasks again
        to the selected participants not yet in; who they are."""
        with self.cond:
            p = self._progress(round_)
            c = self.collecting
            if c is None or c.round != round_:
                c = RoundCollection(round_, self.model_version, dict(p.selected))
                self.collecting = c
            c.received |= set(acknowledged) & set(c.selected)
            self._enter("training")
            rest = [q for q in sorted(c.selected) if q not in c.received and q not in c.in_flight]
            self.tasks.update({q: Task(pb.TASK_KIND_TRAIN, round_, c.model_version) for q in rest})
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
            for q in sorted(set(participants) & set(c.selected) - c.received - c.in_flight):
                seq = self._journal({"e": "update", "pid": q, "round": round_})
                c.received.add(q)
                task = self.tasks.get(q)
                if task is not None and task.kind == pb.TASK_KIND_TRAIN:
                    del self.tasks[q]
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
        return c is not None and c.received >= set(c.selected)

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
            self._enter("aggregating")
            received = set() if c is None else c.received
            received |= set(acknowledged) & set(p.selected)
            late = []
            for q in p.selected:
                task = self.tasks.get(q)
                if task is not None and task.kind == pb.TASK_KIND_TRAIN:
                    del self.tasks[q]
                    if q not in received:
                        late.append(q)
                        self.members[q].timeouts += 1
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

    def record_round(self, record: dict[str, Any]) -> list[str]:
        """Append a finished round to the history; the round in flight is done. What its
        contributors did (a good or a rolled-back model) goes to the quarantine; who
        that convicted."""
        with self.cond:
            convicted: list[str] = []
            p = self.progress
            if p is not None and p.round == record["round"] and not p.abandon:
                # Whose updates shaped the model: received, and not rejected by the defence.
                rejected = {r.get("participant_id") for r in (p.reply or {}).get("rejected", [])}
                shaped = [q for q in p.received if q not in rejected]
                failed = bool(record.get("rolled_back") or record.get("merge_refused"))
                convicted = self.quarantine.record(shaped, failed)
                record["convicted"] = convicted
            if self.store is not None:
                self.store.append_round(record)
            self.history.append(record)
            self.progress = None
            self._persist(export=True, when_due=True)
            self.cond.notify_all()
            return convicted

    def finish(self, rounds: int) -> None:
        """The federation is done: every member's next task is DONE."""
        with self.cond:
            self._enter("done")
            self.stage = "done"
            # One update, one listener call: _enter("done") has woken every poll already.
            done = Task(pb.TASK_KIND_DONE, rounds, self.model_version)
            self.tasks.update(dict.fromkeys(self.members, done))
            self._persist(export=True)
            self.cond.notify_all()

    def fail(self, error: str) -> None:
        """The federation failed; the service stays up to report it. Not persisted: a
        restart tries again from the last good phase."""
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

    def _export(self) -> dict[str, Any]:
        """history.json's content (cond held)."""
        return {
            "phase": self.phase,
            "round": self.round,
            "model_version": self.model_version,
            "members": {p: vars(m) for p, m in self.members.items()},
            "history": list(self.history),
            "purity": self.purity,
            "error": self.error,
        }


def _member(data: dict[str, Any]) -> Member:
    """A member read back (its last_seen is set anew: the clock is this process's)."""
    return Member(**{**data, "last_seen": time.monotonic()})


def _progress(data: dict[str, Any]) -> RoundProgress:
    """A round in flight read back (JSON made its cluster ids strings)."""
    acc = {int(c): float(a) for c, a in data["cluster_accuracy"].items()}
    judged = data.get("judgement")
    judgement = None if judged is None else Judgement(**judged)
    return RoundProgress(**{**data, "cluster_accuracy": acc, "judgement": judgement})


def _round_record(record: dict[str, Any]) -> dict[str, Any]:
    """A history entry read back (JSON made its cluster ids strings)."""
    maps = (
        "cluster_weights",
        "group_accuracy",
        "cluster_accuracy",
        "personal_group_accuracy",
        "personal_cluster_accuracy",
    )
    out = dict(record)
    for key in maps:
        if key in record:
            out[key] = {int(c): float(v) for c, v in record[key].items()}
    if "failed_clusters" in record:
        out["failed_clusters"] = {int(c): int(n) for c, n in record["failed_clusters"].items()}
    out.setdefault("cluster_weights", {})
    out.setdefault("group_accuracy", {})
    return out


def _tensor_of(data: dict[str, Any]) -> torch.Tensor:
    """A tensor an older snapshot held inline as JSON ({"dtype", "values"})."""
    return torch.tensor(data["values"], dtype=getattr(torch, data["dtype"]))
