"""The aggregator's state, in one place: versioned global models and the open round.

All mutation goes through methods holding one lock; `persist`, `save` and `restore` carry
the accepted updates of the open round, the newest global model and the round counters
over a restart (safetensors, never pickle; each file written durably before it counts).
Aggregate is idempotent: the report of the last aggregated round is kept (and saved), and
asking for that round again returns it unchanged, so a clusterer that died after asking,
or lost the answer, can simply ask again. Updates are aggregated in participant-id order,
so a restored aggregator computes bit for bit what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from services.aggregator.rounds import aggregate_round
from services.common.errors import NotFoundError, SpecMismatchError, StateError
from services.common.files import durable_write
from services.common.settings import DefenceSettings
from services.common.strategies import Strategy
from services.common.tensors import TensorSpec, check_spec, flatten, spec_of, unflatten

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
    delta: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


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
        )


class AggregatorState:
    """Global model versions, the open round and its pending updates."""

    def __init__(
        self,
        initial: OrderedDict[str, torch.Tensor],
        keep_versions: int = 3,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")  # where aggregate() computes
        self.spec: tuple[TensorSpec, ...] = spec_of(initial)
        self.reference = OrderedDict((k, v.clone()) for k, v in initial.items())
        self.keep_versions = max(2, keep_versions)
        self.versions: OrderedDict[int, torch.Tensor] = OrderedDict(
            {0: flatten(initial, self.spec)}
        )
        self.version = 0
        self.open_round = 0
        self.pending: OrderedDict[str, PendingUpdate] = OrderedDict()
        self.last_report: RoundReport | None = None  # of round open_round - 1
        self._receiving: set[str] = set()
        self._spare: list[torch.Tensor] = []  # delta buffers of the last round, to reuse
        self.lock = threading.Condition()

    def buffer(self, numel: int) -> torch.Tensor:
        """A flat float32 buffer for an incoming update: one the last round used when there
        is one (its pages are mapped already: receiving into a fresh buffer costs a page
        fault per 4 KiB), else a new one."""
        with self.lock:
            if self._spare and self._spare[-1].numel() == numel:
                return self._spare.pop()
        return torch.empty(numel, dtype=torch.float32)

    def _recycle(self, updates: list[PendingUpdate]) -> None:
        """Keep a closed round's delta buffers for the next round (as many as it used)."""
        self._spare = [u.delta for u in updates]

    def weights(self, version: int = -1) -> tuple[int, OrderedDict[str, torch.Tensor]]:
        """A stored version as named tensors (-1: the newest)."""
        with self.lock:
            v = self.version if version < 0 else version
            if v not in self.versions:
                raise NotFoundError(
                    f"model version {v} is not kept (have {', '.join(map(str, self.versions))})"
                )
            flat = self.versions[v]
        return v, unflatten(flat, self.spec, self.reference)

    def begin_update(self, participant: str, round_: int, base_version: int) -> torch.Tensor:
        """Check that an update may start; reserve the participant; return the base model."""
        with self.lock:
            if round_ != self.open_round:
                raise StateError(
                    f"round {round_} is not open (the open round is {self.open_round})"
                )
            if base_version != self.version:
                raise StateError(
                    f"update was trained from model version {base_version}; "
                    f"round {round_} expects version {self.version}"
                )
            # A stream of the same participant still being torn down (its sender gave up or
            # was cut off) releases its reservation in a moment: wait for that, briefly.
            self.lock.wait_for(lambda: participant not in self._receiving, timeout=RELEASE_WAIT_S)
            if participant in self.pending or participant in self._receiving:
                raise StateError(f"{participant} already submitted an update for round {round_}")
            self._receiving.add(participant)
            return self.versions[self.version]

    def end_update(self, update: PendingUpdate | None, round_: int) -> None:
        """Accept a fully validated update (or release the reservation when None)."""
        with self.lock:
            self._receiving.discard(update.participant if update else "")
            self.lock.notify_all()
            if update is None:
                return
            if round_ != self.open_round:
                raise StateError(f"round {round_} closed while the update was streaming")
            self.pending[update.participant] = update

    def release(self, participant: str) -> None:
        """Forget a reservation whose stream failed."""
        with self.lock:
            self._receiving.discard(participant)
            self.lock.notify_all()

    def aggregate(
        self,
        round_: int,
        strategy: Strategy,
        cluster_accuracy: dict[int, float],
        defence: DefenceSettings,
        lr: float,
        abandon: bool = False,
    ) -> RoundReport:
        """Close the open round: defence and merge into a new version (or drop it all).

        Asked again for the round just closed, it returns that round's report unchanged
        (nothing is aggregated twice).
        """
        with self.lock:
            if round_ == self.open_round - 1 and self.last_report is not None:
                return replace(self.last_report, replayed=True)
            if round_ != self.open_round:
                raise StateError(
                    f"round {round_} is not open (the open round is {self.open_round})"
                )
            # Canonical order: the same updates give the same bits however they arrived
            # (or were read back from their files after a restart).
            updates = [self.pending[p] for p in sorted(self.pending)]
            base = self.versions[self.version]
            if abandon or not updates:
                self._recycle(updates)
                self.pending.clear()
                self.open_round += 1
                self.last_report = RoundReport(self.version, 0, {}, {}, {}, {}, abandoned=True)
                return self.last_report
            # A failure here leaves the round open with its updates (nothing changes).
            on = self.device
            outcome = aggregate_round(
                base.to(on),
                torch.stack([u.delta.to(on, non_blocking=True) for u in updates]),
                [u.cluster for u in updates],
                [u.samples for u in updates],
                strategy,
                round_,
                cluster_accuracy,
                defence,
                [u.metrics.get("loss_before", 1.0) for u in updates],
                lr,
            )
            new = outcome.global_weights.cpu()
            if not torch.equal(new, base):
                self.version += 1
                self.versions[self.version] = new
                # Version 0 (w0) stays: late joiners and a restarted clusterer pre-train
                # from it.
                while len(self.versions) > self.keep_versions + 1:
                    oldest = next(v for v in self.versions if v != 0)
                    del self.versions[oldest]
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
            )
            return self.last_report

    def persist(self, update: PendingUpdate, round_: int, directory: Path) -> Path:
        """Write an accepted update durably (written, flushed, renamed) before it is
        acknowledged; `restore` brings it back into its round after a crash."""
        from safetensors.torch import save_file

        pending = directory / PENDING
        pending.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(update.participant.encode()).hexdigest()[:24]
        path = pending / f"r{round_}-{digest}.safetensors"
        meta = {
            "participant": update.participant,
            "cluster": str(update.cluster),
            "samples": str(update.samples),
            "round": str(round_),
            "metrics": json.dumps(update.metrics),
        }
        durable_write(
            path, lambda tmp: save_file({"delta": update.delta.contiguous()}, str(tmp), meta)
        )
        return path

    def save(self, directory: Path) -> None:
        """Write the newest global model (safetensors), the round counters and the last
        round's report, durably; then drop the persisted updates of closed rounds.

        Called after every aggregation; `restore` reads it back after a restart.
        """
        from safetensors.torch import save_file

        with self.lock:
            version, open_round = self.version, self.open_round
            flat = self.versions[version]
            report = None if self.last_report is None else self.last_report.to_json()
        weights = unflatten(flat, self.spec, self.reference)
        directory.mkdir(parents=True, exist_ok=True)
        model = directory / f"model-v{version}.safetensors"
        durable_write(
            model, lambda tmp: save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
        )
        state = json.dumps(
            {"version": version, "open_round": open_round, "model": model.name, "report": report},
            default=float,
        )
        durable_write(directory / "state.json", lambda tmp: tmp.write_text(state))
        for old in directory.glob("model-v*.safetensors"):
            if old != model:
                old.unlink(missing_ok=True)
        for done in (directory / PENDING).glob("r*.safetensors"):
            if _round_of(done) < open_round:
                done.unlink(missing_ok=True)

    def restore(self, directory: Path) -> bool:
        """Load a saved state and the persisted updates of its open round, if there are any
        (tensors must match this model's spec; nothing is unpickled)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        meta = directory / "state.json"
        restored = False
        if meta.exists():
            info = json.loads(meta.read_text())
            weights = load_file(str(directory / info["model"]))  # safetensors: no pickle
            ordered = OrderedDict((s.name, weights[s.name]) for s in self.spec if s.name in weights)
            check_spec(ordered, self.spec)
            with self.lock:
                self.version = int(info["version"])
                self.open_round = int(info["open_round"])
                initial = self.versions[0]  # w0 is rebuilt from the model's seed, not stored
                self.versions = OrderedDict({0: initial, self.version: flatten(ordered, self.spec)})
                self.reference = ordered
                report = info.get("report")
                self.last_report = None if report is None else RoundReport.from_json(report)
            restored = True
        size = self.versions[self.version].numel()
        for path in sorted((directory / PENDING).glob("r*.safetensors")):
            if _round_of(path) != self.open_round:
                path.unlink(missing_ok=True)  # a closed round's (or a stale) update
                continue
            with safe_open(str(path), "pt") as fh:
                info = fh.metadata()
                delta = fh.get_tensor("delta")
            if delta.shape != (size,) or not bool(torch.isfinite(delta).all()):
                raise SpecMismatchError(f"{path} does not hold an update of this model")
            update = PendingUpdate(
                info["participant"],
                int(info["cluster"]),
                int(info["samples"]),
                delta,
                {k: float(v) for k, v in json.loads(info["metrics"]).items()},
            )
            with self.lock:
                self.pending[update.participant] = update
            restored = True
        return restored
