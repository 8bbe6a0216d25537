"""Durability around the clusterer's state: the journal, the snapshot and the replay.

The state's rules (membership.py, board.py, collection.py, composed in state.py) know
nothing of files. This layer writes them through a ClustererStore (store.py): every change
an RPC makes (a join, a pre-training delta, an evaluation, an accepted update) is journaled
and durable before the RPC is acknowledged, and every phase change writes a snapshot of the
whole state, the round in flight included (its plan, what came in, the aggregator's
answer), so a restarted clusterer goes on where the killed one stopped. The format on disk
is the store's: a snapshot (state.json), the journal since it, rounds.jsonl and
history.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.clusterer.board import Task, TaskKind
from services.clusterer.collection import Evaluation, RoundCollection, RoundProgress
from services.clusterer.membership import member_of
from services.clusterer.store import ClustererStore
from services.core.errors import ConfigError
from services.core.quarantine import Judgement, Quarantine
from services.core.record import RoundRecord

if TYPE_CHECKING:
    from services.clusterer.state import ClustererState

logger = logging.getLogger(__name__)


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """'key: old -> new' for every setting that differs, in key order."""
    keys = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
    return ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys)


class Journal:
    """A state's durability: its store, what goes in, what comes back (cond held by the
    caller throughout, except `durable`)."""

    def __init__(self, store: ClustererStore) -> None:
        self.store = store

    # ---- opening: restore, replay, fold into a snapshot --------------------------------
    def open(
        self,
        state: ClustererState,
        rng: np.random.Generator,
        experiment: Mapping[str, Any] | None = None,
    ) -> bool:
        """Restore state from the store (rng included: later rounds draw as they would
        have); whether there was anything to restore. A store of another experiment is
        refused rather than mixing two experiments."""
        store = self.store
        state.rng = rng
        state.experiment = dict(experiment or {})
        found = store.load()
        if found is not None:
            kept = (found.snapshot or {}).get("experiment")
            if kept is not None and kept != state.experiment:
                raise ConfigError(
                    f"{store.directory} holds the state of another experiment "
                    f"({changes(kept, state.experiment)}): start with the same settings, "
                    "or with an empty --state-dir"
                )
            if found.snapshot is not None:
                self.restore(state, found.snapshot)
            for event in found.events:
                self.replay(state, event)
            self._after_restore(state)
        pre = state.pretraining
        store.drop_deltas(set(pre.files.values()))
        if pre.centroids and pre.centroids_file is None:  # a snapshot kept them inline
            pre.centroids_file = store.save_centroids(pre.centroids)
        self.snapshot(state)  # the journal (and any torn tail) is folded into a snapshot
        store.drop_centroids(pre.centroids_file)
        return found is not None

    # ---- writing ---------------------------------------------------------------------
    def append(self, event: dict[str, Any]) -> int:
        """Journal an RPC's change; the record's number, for `durable`."""
        return self.store.append(event)

    def durable(self, seq: int) -> None:
        """Wait until journal record seq is on disk, after the cond is released: the RPC
        is acknowledged only then, and concurrent RPCs share one fsync."""
        if seq:
            self.store.sync(seq)

    def snapshot(self, state: ClustererState) -> None:
        """Snapshot the whole state (a phase change)."""
        self.store.snapshot(self.data(state))

    def export(self, state: ClustererState, when_due: bool = False) -> None:
        """Write history.json (with `when_due`, only if it is cheap enough by now)."""
        self.store.export(lambda: export_of(state), when_due)

    def append_round(self, record: RoundRecord) -> None:
        self.store.append_round(record.to_dict())

    def save_delta(self, pid: str, delta: torch.Tensor) -> str:
        return self.store.save_delta(pid, delta)

    def save_centroids(self, centroids: dict[int, torch.Tensor]) -> str:
        return self.store.save_centroids(centroids)

    @staticmethod
    def data(state: ClustererState) -> dict[str, Any]:
        """Everything a restart needs, JSON-able."""
        c = state.collecting
        ev = state.evaluations
        pre = state.pretraining
        return {
            "experiment": state.experiment,
            "stage": state.stage,
            "phase": state.phase,
            "round": state.round,
            "model_version": state.model_version,
            "members": {p: vars(m) for p, m in state.members.items()},
            "deltas": dict(pre.files),
            "centroids_file": pre.centroids_file,
            "purity": state.purity,
            "rng": state.rng.bit_generator.state if state.rng is not None else None,
            "progress": asdict(state.progress) if state.progress is not None else None,
            "collecting": None
            if c is None
            else {
                "round": c.round,
                "model_version": c.model_version,
                "selected": c.selected,
                "received": sorted(c.received),
                "enough": c.enough,
            },
            "evaluations": {
                tag: {
                    "asked": ev.asked.get(tag, []),
                    "results": {p: vars(e) for p, e in got.items()},
                }
                for tag, got in ev.results.items()
            },
            "rounds": len(state.history),  # the records are in the store's rounds.jsonl
            "quarantine": state.quarantine.to_json(),
        }

    # ---- reading back ----------------------------------------------------------------
    def restore(self, state: ClustererState, data: dict[str, Any]) -> None:
        """Load a snapshot."""
        store = self.store
        state.stage = data["stage"]
        state.enter(data["phase"])
        state.round = int(data["round"])
        state.model_version = int(data["model_version"])
        state.membership.members = {p: member_of(m) for p, m in data["members"].items()}
        pre = state.pretraining
        pre.files = dict(data["deltas"])
        pre.deltas = {p: store.load_delta(f) for p, f in pre.files.items()}
        pre.centroids_file = data.get("centroids_file")
        if pre.centroids_file:
            pre.centroids = store.load_centroids(pre.centroids_file)
        else:  # snapshots before the centroids had their own file held them as JSON
            inline = data.get("centroids", {})
            pre.centroids = {int(k): _tensor_of(v) for k, v in inline.items()}
        state.purity = data["purity"]
        state.membership.quarantine = Quarantine.from_json(data.get("quarantine"))
        if data["rng"] is not None and state.rng is not None:
            state.rng.bit_generator.state = data["rng"]
        p = data["progress"]
        state.progress = None if p is None else _progress(p)
        c = data["collecting"]
        state.collecting = (
            None
            if c is None
            else RoundCollection(
                int(c["round"]),
                int(c["model_version"]),
                dict(c["selected"]),
                set(c["received"]),
                enough=c.get("enough"),
            )
        )
        state.evaluations.results, state.evaluations.asked = {}, {}
        for tag, ev in data["evaluations"].items():
            state.evaluations.restore(
                tag, ev["asked"], {p: Evaluation(**e) for p, e in ev["results"].items()}
            )
        if "history" in data:  # a snapshot written before rounds.jsonl: move it there
            state.history = [RoundRecord.from_dict(h) for h in data["history"]]
            store.rewrite_rounds(data["history"])
        else:
            state.history = [RoundRecord.from_dict(h) for h in store.load_rounds(data["rounds"])]

    def replay(self, state: ClustererState, event: dict[str, Any]) -> None:
        """Apply one journal record on top of the snapshot (records are idempotent, so one
        replayed twice changes nothing)."""
        kind, pid = event["e"], event["pid"]
        members = state.members
        if kind == "join":
            members.setdefault(pid, member_of(event["member"]))
        elif kind == "pretrain":
            state.pretraining.deltas[pid] = self.store.load_delta(event["file"])
            state.pretraining.files[pid] = event["file"]
            if pid in members:
                members[pid].cluster = int(event["cluster"])
        elif kind == "eval":
            results = state.evaluations.results.get(event["tag"])
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
            c = state.collecting
            if c is not None and c.round == int(event["round"]):
                c.received.add(pid)

    @staticmethod
    def _after_restore(state: ClustererState) -> None:
        """What a restored state needs before anyone asks: everyone counts as just heard
        from, and a member that joined after clustering and has no delta yet gets its
        pre-training task again (tasks are handed out anew, not stored)."""
        state.membership.all_heard_now()
        if state.strategy.clustered and state.stage in ("clustered", "done"):
            for p, m in state.members.items():
                if m.cluster < 0 and p not in state.pretraining.deltas:
                    state.tasks[p] = Task(TaskKind.PRETRAIN, -1, 0)
        logger.info(
            "restored %d members, stage %s, round %d (%s), %d rounds done",
            len(state.members),
            state.stage,
            state.round,
            state.progress.step if state.progress else "-",
            len(state.history),
        )


def export_of(state: ClustererState) -> dict[str, Any]:
    """history.json's content."""
    return {
        "phase": state.phase,
        "round": state.round,
        "model_version": state.model_version,
        "members": {p: vars(m) for p, m in state.members.items()},
        "history": [h.to_dict() for h in state.history],
        "purity": state.purity,
        "error": state.error,
    }


def _progress(data: dict[str, Any]) -> RoundProgress:
    """A round in flight read back (JSON made its cluster ids strings)."""
    acc = {int(c): float(a) for c, a in data["cluster_accuracy"].items()}
    judged = data.get("judgement")
    judgement = None if judged is None else Judgement(**judged)
    return RoundProgress(**{**data, "cluster_accuracy": acc, "judgement": judgement})


def _tensor_of(data: dict[str, Any]) -> torch.Tensor:
    """A tensor an older snapshot held inline as JSON ({"dtype", "values"})."""
    return torch.tensor(data["values"], dtype=getattr(torch, data["dtype"]))
