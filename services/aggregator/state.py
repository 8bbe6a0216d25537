"""The aggregator's state, in one place: versioned global models and the open round.

All mutation goes through methods holding one lock; `persist`, `save` and `restore` carry
the accepted updates of the open round, the newest global model and the round counters
over a restart (safetensors, never pickle; each file written durably before it counts).
Aggregate is idempotent: the report of the last aggregated round is kept (and saved), and
asking for that round again returns it unchanged, so a clusterer that died after asking,
or lost the answer, can simply ask again. Updates are aggregated in participant-id order,
so a restored aggregator computes bit for bit what an uninterrupted one would have.
Deltas and older versions live where the `DeltaStore` puts them: memory, or files when a
memory budget is set.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from services.aggregator.store import (
    Delta,
    DeltaStore,
    DiskRow,
    RowFile,
    safetensors_row,
    write_safetensors,
)
from services.common.files import durable_write
from services.common.settings import DefenceSettings
from services.common.wire import Sink
from services.core.buffered import buffered_round
from services.core.errors import NotFoundError, SpecMismatchError, StaleError, StateError
from services.core.guard import STEPS_KEPT, check_merge, remember
from services.core.merge import local_steps
from services.core.privacy import CentralNoise
from services.core.rounds import aggregate_round
from services.core.strategies import Strategy
from services.core.tensors import TensorSpec, check_spec, flatten, spec_of, unflatten

RELEASE_WAIT_S = 5.0
PENDING = "pending"  # accepted updates of the open round, one safetensors file each


def _round_of(path: Path) -> int:
    """The round in a persisted update's file name (r{round}-{id}.safetensors)."""
    try:
        return int(path.name[1:].split("-", 1)[0])
    except ValueError:
        return -1


@dataclass
class PendingUpdate:
    """One participant's accepted update for the open round, as a delta."""

    participant: str
    cluster: int
    samples: int
    delta: Delta  # in memory or in a file (the store decides); empty when encrypted
    metrics: dict[str, float] = field(default_factory=dict)
    ciphertexts: tuple[bytes, ...] = ()  # --secure he: n_i * w_i, encrypted (sealed.py)
    base_version: int = -1  # --mode async: the version it was trained from (delta's base)
    key: str = ""  # --mode async: the name of its persisted file (u{n}-{digest})


@dataclass(frozen=True)
class RoundClose:
    """What Aggregate asks of a round: close `round_` with `strategy` (the clusters'
    accuracies and the defence settings feed it; `lr` is q-FFL's rate), or drop its
    updates when `abandon`. `training` (local epochs, batch size) gives q-FFL the local
    steps behind each update; without `guard` only a non-finite merge is refused."""

    round_: int
    strategy: Strategy
    cluster_accuracy: dict[int, float]
    defence: DefenceSettings
    lr: float
    abandon: bool = False
    training: tuple[int, int] | None = None
    guard: bool = True
    privacy: CentralNoise | None = None  # --dp central: the round's mechanism
    # --mode async: the clusters whose buffers are aggregated (None: a synchronous round,
    # all updates) and every cluster of the federation (the fair weights' denominator).
    flush: frozenset[int] | None = None
    clusters: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoundReport:
    """What Aggregate did."""

    version: int
    updates: int
    rejected: dict[str, str]
    cluster_weights: dict[int, float]
    rejected_clusters: dict[int, str]
    fallbacks: dict[int, str]
    rejected_per_cluster: dict[int, int] = field(default_factory=dict)
    abandoned: bool = False  # the round's updates were dropped and the model kept
    replayed: bool = False  # the answer of a round aggregated before (asked again)
    refused: str = ""  # why the divergence guard refused the merge (the model was kept)
    privacy: dict[str, float] | None = None  # --dp central: what the mechanism did
    merged: tuple[str, ...] = ()  # --mode async: whose buffered updates the flush took
    staleness: tuple[int, ...] = ()  # --mode async: of each update the flush merged
    stale: int = 0  # --mode async: buffered updates refused at the flush (too old)
    shortened_clusters: dict[int, str] = field(default_factory=dict)  # cluster -> why

    @property
    def noise(self) -> dict[str, float]:
        """The privacy report's figures (none without --dp central)."""
        return self.privacy or {}

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (state.json keeps the last one)."""
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> RoundReport:
        """A report read back (JSON made its cluster ids strings)."""

        def ints(d: dict[str, Any]) -> dict[int, Any]:
            return {int(k): v for k, v in d.items()}

        return RoundReport(
            int(data["version"]),
            int(data["updates"]),
            dict(data["rejected"]),
            {int(k): float(v) for k, v in data["cluster_weights"].items()},
            ints(data["rejected_clusters"]),
            ints(data["fallbacks"]),
            {int(k): int(v) for k, v in data["rejected_per_cluster"].items()},
            bool(data.get("abandoned", False)),
            refused=str(data.get("refused", ""))[:400],
            privacy=None
            if data.get("privacy") is None
            else {k: float(v) for k, v in data["privacy"].items()},
            merged=tuple(str(p) for p in data.get("merged", ())),
            staleness=tuple(int(t) for t in data.get("staleness", ())),
            stale=int(data.get("stale", 0)),
            shortened_clusters=ints(data.get("shortened_clusters", {})),
        )


@dataclass(frozen=True)
class Rollback:
    """What Rollback did: round `round`'s version `refused` was replaced by `version`, a
    copy of `to` (kept and saved: asked again for that round, the same answer)."""

    round: int
    refused: int
    to: int
    version: int
    reason: str = ""
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        """As state.json keeps it."""
        return {k: v for k, v in asdict(self).items() if k != "replayed"}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Rollback:
        """Read back from state.json."""
        return Rollback(
            int(data["round"]),
            int(data["refused"]),
            int(data["to"]),
            int(data["version"]),
            str(data.get("reason", ""))[:200],
        )


class AggregatorState:
    """Global model versions, the open round and its pending updates."""

    def __init__(
        self,
        initial: OrderedDict[str, torch.Tensor],
        keep_versions: int = 3,
        device: torch.device | None = None,
        store: DeltaStore | None = None,
        personalise: bool = False,
        max_staleness: int | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")  # where aggregate() computes
        # --personalise: each cluster's model of the current version (in memory, beside the
        # budget: k models); a cluster without one trains from and serves the global model.
        self.personalise = personalise
        self.cluster_models: dict[int, torch.Tensor] = {}
        self.spec: tuple[TensorSpec, ...] = spec_of(initial)
        # Only the tensors that are not averaged (unflatten takes them from here).
        self.reference = OrderedDict(
            (k, v.clone()) for k, v in initial.items() if not v.dtype.is_floating_point
        )
        # --mode async (max_staleness set): updates are buffered across versions, each
        # against the version it was trained from, so that many versions stay kept.
        self.max_staleness = max_staleness
        self.keep_versions = max(2, keep_versions, (max_staleness or 0) + 1)
        self.accepted = 0  # --mode async: updates accepted so far (names their files)
        self.consumed: tuple[str, ...] = ()  # --mode async: files the last flush took
        w0 = flatten(initial, self.spec)
        self.store = store or DeltaStore(w0.numel())
        # The current version is always in memory; with a budget the others are files.
        self.versions: OrderedDict[int, torch.Tensor | DiskRow] = OrderedDict({0: w0})
        self.version = 0
        self.open_round = 0
        self.pending: OrderedDict[str, PendingUpdate] = OrderedDict()
        self.last_report: RoundReport | None = None  # of round open_round - 1
        self.last_rollback: Rollback | None = None  # the newest rollback, if any
        self.steps: list[float] = []  # lengths of the last accepted merges (guard.py)
        self.dp_clip: float | None = None  # --dp central, adaptive: the next round's bound
        self._receiving: set[str] = set()
        self.lock = threading.Condition()

    def buffer(self, numel: int) -> torch.Tensor | RowFile:
        """Where an incoming update's delta goes (`DeltaStore.place`): memory or a file."""
        if numel != self.store.numel:
            raise SpecMismatchError(
                f"an update of {numel} values for a model of {self.store.numel}"
            )
        return self.store.place()

    def discard(self, place: Delta | Sink | None) -> None:
        """Give back the place of an update that was not accepted."""
        if place is not None:
            self.store.release([place])

    def _recycle(self, updates: list[PendingUpdate]) -> None:
        """A closed round's deltas: buffers kept for the next round, files deleted."""
        self.store.release([u.delta for u in updates], round_closed=True)

    def _flat(self, version: int) -> torch.Tensor:
        kept = self.versions[version]
        return kept.load() if isinstance(kept, DiskRow) else kept

    def weights(
        self, version: int = -1, cluster: int | None = None
    ) -> tuple[int, OrderedDict[str, torch.Tensor]]:
        """A stored version as named tensors (-1: the newest); with `cluster`, that
        cluster's model of the newest version (--personalise)."""
        if cluster is not None:
            with self.lock:
                if not self.personalise:
                    raise StateError("this aggregator keeps no per-cluster models (--personalise)")
                if version >= 0 and version != self.version:
                    raise NotFoundError(
                        f"cluster models are kept for the newest version ({self.version}) only"
                    )
                v = self.version
                flat = self.cluster_models.get(cluster)
                if flat is None:
                    flat = self._flat(v)
            return v, unflatten(flat, self.spec, self.reference, share=True)
        with self.lock:
            v = self.version if version < 0 else version
            if v not in self.versions:
                raise NotFoundError(
                    f"model version {v} is not kept (have {', '.join(map(str, self.versions))})"
                )
            kept = self.versions[v]
        # Versions are never changed in place: readers share them (no copy of the model).
        # An older version is read from its file whole, outside the budget (GetModel calls
        # are capped at 4 at a time); one dropped meanwhile is not kept any more.
        try:
            flat = kept.load() if isinstance(kept, DiskRow) else kept
        except FileNotFoundError:
            raise NotFoundError(f"model version {v} is not kept any more") from None
        return v, unflatten(flat, self.spec, self.reference, share=True)

    def begin_update(
        self, participant: str, round_: int, base_version: int, cluster: int = -1
    ) -> torch.Tensor:
        """Check that an update may start; reserve the participant; return the base model
        (personalised: its cluster's)."""
        kept: torch.Tensor | DiskRow | None = None
        with self.lock:
            if self.max_staleness is not None:  # --mode async: any recent version
                kept = self._async_base(base_version)
            elif round_ != self.open_round:
                raise StateError(
                    f"round {round_} is not open (the open round is {self.open_round})"
                )
            elif base_version != self.version:
                raise StateError(
                    f"update was trained from model version {base_version}; "
                    f"round {round_} expects version {self.version}"
                )
            # A stream of the same participant still being torn down (its sender gave up or
            # was cut off) releases its reservation in a moment: wait for that, briefly.
            self.lock.wait_for(lambda: participant not in self._receiving, timeout=RELEASE_WAIT_S)
            if participant in self.pending or participant in self._receiving:
                if kept is not None:
                    raise StateError(
                        f"{participant} has an update in its cluster's buffer already (one "
                        "per participant and buffer)"
                    )
                raise StateError(f"{participant} already submitted an update for round {round_}")
            self._receiving.add(participant)
            if kept is None:
                return self._base(cluster)
        if isinstance(kept, torch.Tensor):
            return kept
        try:  # an older version spilled to a file: read outside the lock
            return kept.load()
        except FileNotFoundError:
            self.release(participant)
            raise StaleError(
                f"model version {base_version} is not kept any more: train again from the newest"
            ) from None

    def _async_base(self, base_version: int) -> torch.Tensor | DiskRow:
        """--mode async: the kept version an update was trained from, if it is at most
        max_staleness versions old (lock held; a version spilled to a file is read by the
        caller, after the lock)."""
        assert self.max_staleness is not None
        age = self.version - base_version
        if base_version < 0 or age < 0:
            raise StateError(
                f"update was trained from model version {base_version}; the newest is "
                f"{self.version}"
            )
        if age > self.max_staleness:
            raise StaleError(
                f"update was trained from model version {base_version}, {age} versions "
                f"behind the newest ({self.version}; --max-staleness {self.max_staleness}): "
                "train again from the newest"
            )
        if base_version not in self.versions:
            raise StaleError(
                f"model version {base_version} is not kept any more (after a restart only "
                "the newest two are): train again from the newest"
            )
        return self.versions[base_version]

    def _base(self, cluster: int) -> torch.Tensor:
        """The model an update of `cluster` was trained from (lock held)."""
        base = self.versions[self.version]
        assert isinstance(base, torch.Tensor)  # the current version stays in memory
        if self.personalise:
            return self.cluster_models.get(cluster, base)
        return base

    def end_update(self, update: PendingUpdate | None, round_: int) -> None:
        """Accept a fully validated update (or release the reservation when None)."""
        with self.lock:
            self._receiving.discard(update.participant if update else "")
            self.lock.notify_all()
            if update is None:
                return
            if self.max_staleness is None and round_ != self.open_round:
                raise StateError(f"round {round_} closed while the update was streaming")
            self.pending[update.participant] = update
            self.lock.notify_all()

    def release(self, participant: str) -> None:
        """Forget a reservation whose stream failed."""
        with self.lock:
            self._receiving.discard(participant)
            self.lock.notify_all()

    def aggregate(self, close: RoundClose) -> RoundReport:
        """Close the open round: defence and merge into a new version (or drop it all, or
        keep the version when the divergence guard refuses the merge: guard.py).

        Asked again for the round just closed, it returns that round's report unchanged
        (nothing is aggregated twice).
        """
        with self.lock:
            if close.flush is not None:
                return self._flush(close)
            closing = self._closing(close.round_, close.abandon)
            if isinstance(closing, RoundReport):
                return closing
            updates = closing
            base = self.versions[self.version]
            assert isinstance(base, torch.Tensor)
            # A failure here leaves the round open with its updates (nothing changes).
            on = self.device
            outcome = aggregate_round(
                base.to(on),
                self.store.rows([u.delta for u in updates], on),
                [u.cluster for u in updates],
                [u.samples for u in updates],
                close.strategy,
                close.round_,
                close.cluster_accuracy,
                close.defence,
                [u.metrics.get("loss_before", 1.0) for u in updates],
                close.lr,
                None
                if close.training is None
                else local_steps([u.samples for u in updates], *close.training),
                {c: m.to(on) for c, m in self.cluster_models.items()} if self.personalise else None,
                close.privacy,
            )
            new = outcome.global_weights.cpu()
            private = None
            if outcome.noise is not None:  # spent whatever the guard decides
                self.dp_clip = outcome.noise.next_clip
                private = {
                    "clip": outcome.noise.clip,
                    "next_clip": outcome.noise.next_clip,
                    "sigma": outcome.noise.sigma,
                    "sensitivity": outcome.noise.sensitivity,
                    "clipped": float(outcome.noise.clipped),
                }
            check = check_merge(base, new, self.steps, bounds=close.guard)
            if check.refused:  # the version stays; the round ends with the reason
                self._recycle(updates)
                self.pending.clear()
                self.open_round += 1
                self.last_report = RoundReport(
                    self.version,
                    len(updates),
                    {},
                    outcome.cluster_weights,
                    {},
                    {},
                    refused=check.refused,
                    privacy=private,
                )
                return self.last_report
            if not torch.equal(new, base):
                self.steps = remember(self.steps, check.step)
                self._add_version(new)
                # The surviving clusters' models move on with the version (new dict: a
                # reader holding the old one keeps a consistent set).
                moved = {c: m.cpu() for c, m in outcome.cluster_models.items()}
                self.cluster_models = {**self.cluster_models, **moved}
            self._recycle(updates)
            self.pending.clear()
            self.open_round += 1
            d = outcome.defence
            per_cluster = {u.cluster: 0 for u in updates}  # zero counts are exported too
            for i in d.rejected_updates:
                per_cluster[updates[i].cluster] += 1
            self.last_report = RoundReport(
                self.version,
                len(updates),
                {updates[i].participant: why for i, why in d.rejected_updates.items()},
                outcome.cluster_weights,
                d.rejected_clusters,
                d.fallbacks,
                per_cluster,
                privacy=private,
                shortened_clusters=d.shortened_reasons,
            )
            return self.last_report

    def _flush(self, close: RoundClose) -> RoundReport:
        """--mode async: aggregate the buffers of close.flush into the next version
        (core/buffered.py); the other clusters' updates stay buffered. An update that grew
        staler than max_staleness while it waited is refused here (lock held)."""
        assert close.flush is not None and self.max_staleness is not None
        if close.round_ == self.open_round - 1 and self.last_report is not None:
            return replace(self.last_report, replayed=True)
        if close.round_ != self.open_round:
            raise StateError(
                f"version step {close.round_} is not the next (the next is {self.open_round})"
            )
        taken = [
            self.pending[p] for p in sorted(self.pending) if self.pending[p].cluster in close.flush
        ]
        ages = {u.participant: self.version - u.base_version for u in taken}
        fresh = [u for u in taken if ages[u.participant] <= self.max_staleness]
        stale = len(taken) - len(fresh)
        merged = tuple(u.participant for u in taken)
        if not fresh:
            report = RoundReport(
                self.version, 0, {}, {}, {}, {}, abandoned=True, merged=merged, stale=stale
            )
            return self._flushed(taken, report)
        base = self.versions[self.version]
        assert isinstance(base, torch.Tensor)
        on = self.device
        outcome = buffered_round(
            base.to(on),
            self.store.rows([u.delta for u in fresh], on),
            [u.cluster for u in fresh],
            [u.samples for u in fresh],
            [ages[u.participant] for u in fresh],
            close.strategy,
            self.version,
            close.cluster_accuracy,
            close.defence,
            close.clusters,
        )
        new = outcome.global_weights.cpu()
        check = check_merge(base, new, self.steps, bounds=close.guard)
        d = outcome.defence
        staleness = tuple(ages[u.participant] for u in fresh)
        if check.refused:
            report = RoundReport(
                self.version,
                len(fresh),
                {},
                outcome.cluster_weights,
                {},
                {},
                refused=check.refused,
                merged=merged,
                staleness=staleness,
                stale=stale,
            )
            return self._flushed(taken, report)
        if not torch.equal(new, base):
            self.steps = remember(self.steps, check.step)
            self._add_version(new)
        per_cluster = {u.cluster: 0 for u in fresh}
        for i in d.rejected_updates:
            per_cluster[fresh[i].cluster] += 1
        report = RoundReport(
            self.version,
            len(fresh),
            {fresh[i].participant: why for i, why in d.rejected_updates.items()},
            outcome.cluster_weights,
            d.rejected_clusters,
            d.fallbacks,
            per_cluster,
            merged=merged,
            staleness=staleness,
            stale=stale,
            shortened_clusters=d.shortened_reasons,
        )
        return self._flushed(taken, report)

    def _flushed(self, taken: list[PendingUpdate], report: RoundReport) -> RoundReport:
        """Take a flush's updates out of the buffers and close its step (lock held)."""
        for u in taken:
            del self.pending[u.participant]
        self.consumed = tuple(u.key for u in taken if u.key)
        self._recycle(taken)
        self.open_round += 1
        self.last_report = report
        return report

    def buffered(self) -> dict[int, int]:
        """--mode async: updates waiting per cluster."""
        with self.lock:
            counts: dict[int, int] = {}
            for u in self.pending.values():
                counts[u.cluster] = counts.get(u.cluster, 0) + 1
            return counts

    def _add_version(self, flat: torch.Tensor) -> None:
        """Make `flat` the newest version (lock held); the oldest but w0 go past
        keep_versions. Version 0 (w0) stays: late joiners and a restarted clusterer
        pre-train from it."""
        base = self.versions[self.version]
        if self.store.limited and isinstance(base, torch.Tensor):
            self.versions[self.version] = self.store.stash(self.version, base)
        self.version += 1
        self.versions[self.version] = flat
        while len(self.versions) > self.keep_versions + 1:
            oldest = next(v for v in self.versions if v != 0)
            gone = self.versions.pop(oldest)
            if isinstance(gone, DiskRow) and not any(k is gone for k in self.versions.values()):
                gone.drop()

    def rollback(self, round_: int, to_version: int, reason: str = "") -> Rollback:
        """Publish a copy of `to_version` as the newest version: the round just closed
        (`round_`) made a version its evaluators refused. Versions only grow (a
        participant's cache of version v is never wrong); asked again for the same round,
        the same answer. StateError when round_ is not the last closed round, an update
        of the open round is already in, or to_version is not an earlier kept version."""
        with self.lock:
            done = self.last_rollback
            if done is not None and done.round == round_:
                if done.to != to_version:
                    raise StateError(
                        f"round {round_} was rolled back to version {done.to} already, "
                        f"not {to_version}"
                    )
                return replace(done, replayed=True)
            if round_ != self.open_round - 1 or self.last_report is None:
                raise StateError(
                    f"round {round_} is not the last aggregated round (the open round is "
                    f"{self.open_round})"
                )
            if self.pending or self._receiving:
                raise StateError(
                    f"round {self.open_round} has updates already: a rollback comes first"
                )
            if not 0 <= to_version < self.version or to_version not in self._kept():
                kept = ", ".join(str(v) for v in self._kept() if v < self.version)
                raise NotFoundError(
                    f"version {to_version} is not an earlier kept version (have {kept})"
                )
            refused = self.version
            self._copy_version(to_version)
            self.steps = self.steps[:-1]  # the refused merge's step is no yardstick
            self.cluster_models = {}  # the refused version's; clusters serve the copy
            self.last_rollback = Rollback(round_, refused, to_version, self.version, reason[:200])
            return self.last_rollback

    def _kept(self) -> list[int]:
        """The versions kept, ascending (lock held)."""
        return sorted(self.versions)

    def _copy_version(self, to_version: int) -> None:
        """Make a copy of kept version `to_version` the newest (lock held)."""
        self._add_version(self._flat(to_version))

    def _closing(self, round_: int, abandon: bool) -> RoundReport | list[PendingUpdate]:
        """The open round's updates in canonical order, or the report to answer without
        aggregating: the last one again (asked twice), or an abandoned round's (lock held)."""
        if round_ == self.open_round - 1 and self.last_report is not None:
            return replace(self.last_report, replayed=True)
        if round_ != self.open_round:
            raise StateError(f"round {round_} is not open (the open round is {self.open_round})")
        # Canonical order: the same updates give the same bits however they arrived (or
        # were read back from their files after a restart).
        updates = [self.pending[p] for p in sorted(self.pending)]
        if abandon or not updates:
            self._recycle(updates)
            self.pending.clear()
            self.open_round += 1
            self.last_report = RoundReport(self.version, 0, {}, {}, {}, {}, abandoned=True)
            return self.last_report
        return updates

    def served(
        self, version: int = -1, cluster: int | None = None
    ) -> tuple[int, str, OrderedDict[str, torch.Tensor]]:
        """What GetModel streams: the version, the header's kind and the tensors."""
        v, weights = self.weights(version, cluster)
        return v, "weights", weights

    def _pending_meta(self, update: PendingUpdate, round_: int) -> dict[str, str]:
        """What a persisted update's file says about it beside its tensors."""
        return {
            "participant": update.participant,
            "cluster": str(update.cluster),
            "samples": str(update.samples),
            "round": str(round_),
            "metrics": json.dumps(update.metrics),
            "base_version": str(update.base_version),
        }

    def _pending_path(self, update: PendingUpdate, round_: int, directory: Path) -> Path:
        """r{round}-{digest} in rounds; --mode async: u{n}-{digest}, n counting accepted
        updates (an update is not tied to a round: it waits in its buffer across versions,
        and state.json names the files each flush consumed)."""
        pending = directory / PENDING
        pending.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(update.participant.encode()).hexdigest()[:24]
        if self.max_staleness is not None:
            if not update.key:
                with self.lock:
                    self.accepted += 1
                    update.key = f"u{self.accepted}-{digest}"
            return pending / f"{update.key}.safetensors"
        return pending / f"r{round_}-{digest}.safetensors"

    def persist(self, update: PendingUpdate, round_: int, directory: Path) -> Path:
        """Write an accepted update durably (written, flushed, renamed) before it is
        acknowledged; `restore` brings it back into its round after a crash."""
        path = self._pending_path(update, round_, directory)
        meta = self._pending_meta(update, round_)
        durable_write(path, lambda tmp: write_safetensors(tmp, {"delta": update.delta}, meta))
        return path

    def save(self, directory: Path) -> None:
        """Write the newest global model (safetensors), the round counters and the last
        round's report, durably; then drop the persisted updates of closed rounds.

        Called after every aggregation; `restore` reads it back after a restart.
        """
        with self.lock:
            version, open_round = self.version, self.open_round
            flat = self._flat(version)
            # The version before the newest: what a rollback of the last round restores.
            earlier = [v for v in self.versions if 0 < v < version]
            previous = max(earlier) if earlier else None
            before = None if previous is None else self.versions[previous]
            report = None if self.last_report is None else self.last_report.to_json()
            rollback = None if self.last_rollback is None else self.last_rollback.to_json()
            steps = list(self.steps)
            dp_clip = self.dp_clip
            clusters = dict(self.cluster_models)
            consumed, accepted = list(self.consumed), self.accepted
        weights = unflatten(flat, self.spec, self.reference, share=True)
        directory.mkdir(parents=True, exist_ok=True)
        model = directory / f"model-v{version}.safetensors"
        durable_write(model, lambda tmp: write_safetensors(tmp, weights))
        info: dict[str, Any] = {
            "version": version,
            "open_round": open_round,
            "model": model.name,
            "report": report,
            "rollback": rollback,
            "steps": steps,
            "dp_clip": dp_clip,
            "previous": None,
        }
        if self.max_staleness is not None:  # --mode async: the buffers' bookkeeping
            info |= {"consumed": consumed, "accepted": accepted}
        kept = [model]
        if previous is not None and before is not None:
            # Written when it was the newest; only a state saved before that lacks it.
            path = directory / f"model-v{previous}.safetensors"
            if not path.exists():
                old = before.load() if isinstance(before, DiskRow) else before
                w = unflatten(old, self.spec, self.reference, share=True)
                durable_write(path, lambda tmp: write_safetensors(tmp, w))
            info["previous"] = {"version": previous, "model": path.name}
            kept.append(path)
        if clusters:  # --personalise: each cluster's model, flat float32 vectors
            path = directory / f"clusters-v{version}.safetensors"
            rows = {f"cluster-{c}": m for c, m in sorted(clusters.items())}
            durable_write(path, lambda tmp: write_safetensors(tmp, rows))
            info["clusters"] = path.name
            kept.append(path)
        commit_state(directory, info, kept)

    def restore(self, directory: Path) -> bool:
        """Load a saved state and the persisted updates of its open round, if there are any
        (tensors must match this model's spec; nothing is unpickled)."""
        from safetensors import safe_open

        meta = directory / "state.json"
        restored = False
        if meta.exists():
            info = json.loads(meta.read_text())
            with self.lock:
                initial = self.versions[0]  # w0 is rebuilt from the model's seed, not stored
                stash = self.store.limited and int(info["version"]) != 0
                if stash and isinstance(initial, torch.Tensor):
                    initial = self.store.stash(0, initial)
            flat, others = _read_model(directory / info["model"], self.spec)
            previous: tuple[int, torch.Tensor | DiskRow] | None = None
            if info.get("previous"):
                p = info["previous"]
                old, _ = _read_model(directory / str(p["model"]), self.spec)
                kept_old = self.store.stash(int(p["version"]), old) if self.store.limited else old
                previous = (int(p["version"]), kept_old)
            clusters = {}
            if info.get("clusters"):
                clusters = _read_clusters(directory / str(info["clusters"]), flat.numel())
            with self.lock:
                self.cluster_models = clusters
                self.version = int(info["version"])
                self.open_round = int(info["open_round"])
                self.versions = OrderedDict({0: initial})
                if previous is not None:
                    self.versions[previous[0]] = previous[1]
                self.versions[self.version] = flat
                if self.version == 0:
                    self.versions[0] = flat
                self.reference = others
                report = info.get("report")
                self.last_report = None if report is None else RoundReport.from_json(report)
                done = info.get("rollback")
                self.last_rollback = None if done is None else Rollback.from_json(done)
                self.steps = [float(x) for x in info.get("steps", [])][-STEPS_KEPT:]
                clip = info.get("dp_clip")
                self.dp_clip = None if clip is None else float(clip)
                self.consumed = tuple(str(n) for n in info.get("consumed", ()))
                self.accepted = int(info.get("accepted", 0))
            restored = True
        size = self.store.numel
        for path in sorted((directory / PENDING).glob("*.safetensors"), key=_pending_order):
            if self.max_staleness is not None and path.name.startswith("u"):
                if path.stem in self.consumed:  # taken by the last flush, not yet deleted
                    path.unlink(missing_ok=True)
                    continue
                self.accepted = max(self.accepted, _number_of(path))
            elif _round_of(path) != self.open_round:
                path.unlink(missing_ok=True)  # a closed round's (or a stale) update
                continue
            with safe_open(str(path), "pt") as fh:  # the metadata only
                info = fh.metadata()
            row = safetensors_row(path)
            if row.numel != size:
                raise SpecMismatchError(f"{path} does not hold an update of this model")
            # Not checked for finiteness: values that were each finite can overflow when
            # the base is subtracted, and the defence rejects such a row ("non-finite").
            delta = self.store.adopt(row)
            sender, cluster, samples, metrics = saved_facts(info)
            update = PendingUpdate(sender, cluster, samples, delta, metrics)
            if self.max_staleness is not None:
                update.base_version = int(info.get("base_version", self.version))
                update.key = path.stem
            with self.lock:
                self.pending[update.participant] = update
            restored = True
        return restored


def _number_of(path: Path) -> int:
    """The count in an asynchronous update's file name (u{n}-{digest}.safetensors)."""
    try:
        return int(path.name[1:].split("-", 1)[0])
    except ValueError:
        return 0


def _pending_order(path: Path) -> tuple[str, int]:
    """Persisted updates in the order they were accepted."""
    return (path.name[0], _number_of(path) if path.name.startswith("u") else _round_of(path))


def saved_facts(info: Mapping[str, str]) -> tuple[str, int, int, dict[str, float]]:
    """Who sent a persisted update, for which cluster, from how many samples and with which
    metrics: its file's metadata, as both states write it."""
    metrics = {k: float(v) for k, v in json.loads(info["metrics"]).items()}
    return info["participant"], int(info["cluster"]), int(info["samples"]), metrics


def commit_state(directory: Path, info: dict[str, Any], kept: list[Path]) -> None:
    """Make `info` the saved state (state.json, durably, once the files it names in `kept`
    are), then drop the model files it does not name and the persisted updates of the
    rounds it closed."""
    state = json.dumps(info, default=float)
    durable_write(directory / "state.json", lambda tmp: tmp.write_text(state))
    for pattern in ("model-v*.safetensors", "clusters-v*", "sealed-v*"):
        for old in directory.glob(pattern):
            if old not in kept:
                old.unlink(missing_ok=True)
    for done in (directory / PENDING).glob("r*.safetensors"):
        if _round_of(done) < int(info["open_round"]):
            done.unlink(missing_ok=True)
    for name in info.get("consumed", ()):  # --mode async: what the last flush took
        (directory / PENDING / f"{name}.safetensors").unlink(missing_ok=True)


def _read_clusters(path: Path, numel: int) -> dict[int, torch.Tensor]:
    """Saved cluster models: float32 vectors named cluster-<id> (safetensors, no pickle)."""
    from safetensors import safe_open

    out: dict[int, torch.Tensor] = {}
    with safe_open(str(path), "pt") as fh:
        for name in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            c = name.removeprefix("cluster-")
            if not c.isdigit() or len(c) > 6:
                raise SpecMismatchError(f"{path}: unexpected tensor {name[:64]!r}")
            t = fh.get_tensor(name)
            if t.dtype != torch.float32 or t.shape != (numel,):
                raise SpecMismatchError(f"{path}: {name!r} is not a model of this shape")
            out[int(c)] = t
    return out


def _read_model(
    path: Path, spec: tuple[TensorSpec, ...]
) -> tuple[torch.Tensor, OrderedDict[str, torch.Tensor]]:
    """A saved model as the flat float32 vector and its non-float tensors, one tensor in
    memory at a time beside the vector (safetensors: nothing is unpickled)."""
    from safetensors import safe_open

    floats = [s for s in spec if s.dtype.is_floating_point]
    flat = torch.empty(sum(s.numel for s in floats), dtype=torch.float32)
    others: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    with safe_open(str(path), "pt") as fh:
        names = set(fh.keys())
        for s in spec:
            if s.name not in names:
                raise SpecMismatchError(f"{path} has no tensor {s.name!r}")
            t = fh.get_tensor(s.name)
            check_spec(OrderedDict({s.name: t}), (s,))
            if s.dtype.is_floating_point:
                flat[offset : offset + s.numel] = t.reshape(-1)
                offset += s.numel
            else:
                others[s.name] = t
            del t
    return flat, others
