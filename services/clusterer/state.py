"""The clusterer's state, in one place: members, tasks, the round being run and its history.

Everything here is plain data guarded by one condition variable (`cond`): RPC handlers
change it and notify; the coordinator thread and long-polling GetTask calls wait on it.
`snapshot()` is the serialisable view the later persistence work saves and restores.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb


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

    def to_pb(self, training: pb.TrainingSettings) -> pb.GetTaskResponse:
        """The GetTask answer for this task."""
        return pb.GetTaskResponse(
            kind=self.kind,  # type: ignore[arg-type]
            round=self.round,
            model_version=self.model_version,
            training=training,
            evaluation_id=self.evaluation_id,
        )


@dataclass
class Evaluation:
    """One participant's evaluation of a model version."""

    accuracy: float
    loss: float
    examples: int


@dataclass
class ClustererState:
    """Members, tasks, the open round and what every finished round measured."""

    # waiting, pretraining, clustering, selecting, evaluating, training, aggregating, done, failed
    phase: str = "waiting"
    round: int = -1
    model_version: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    collecting_round: int | None = None  # round whose updates are accepted now
    selected: dict[str, int] = field(default_factory=dict)  # participant -> cluster, this round
    received: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    pretrain_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    centroids: dict[int, torch.Tensor] = field(default_factory=dict)
    evaluations: dict[str, dict[str, Evaluation]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    purity: float | None = None
    error: str = ""
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def touch(self, participant: str) -> None:
        """Record that a participant was heard from (call with cond held)."""
        m = self.members.get(participant)
        if m is not None:
            m.last_seen = time.monotonic()

    def active(self, liveness_s: float) -> list[str]:
        """Members heard from recently, or busy with a task (call with cond held)."""
        now = time.monotonic()
        return sorted(
            p for p, m in self.members.items() if now - m.last_seen <= liveness_s or p in self.tasks
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
            }
