"""The round protocol (ALGORITHM.md sections 2-7), run by one thread of the clusterer.

It waits for participants, has them pre-train, clusters them, and then each round: has a
sample per cluster evaluate the global model (for the q-weights), selects fairly, collects
updates until everyone selected answered or the deadline passed, has the aggregator
aggregate, and has every participant evaluate the new model. RPC handlers feed it through
the shared state; it never busy-waits.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.clusterer.clustering import cluster, count_sketch
from services.clusterer.config import ClustererConfig
from services.clusterer.selection import fair_select
from services.clusterer.state import ClustererState, Evaluation, Task
from services.common.figures import accuracy_summary, purity
from services.common.grpc_util import call_metadata, with_retries
from services.common.metrics import ClustererMetrics, cluster_label
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.strategies import get_strategy
from services.common.tensors import TensorSpec
from services.common.wire import StreamReader, spec_from_pb

logger = logging.getLogger(__name__)

SKETCH_ABOVE = 4096
SKETCH_DIM = 2048


class ModelCache:
    """Encoded global models (header, chunks, checksum) by version, served to participants."""

    def __init__(self, keep: int = 3) -> None:
        self._models: dict[int, tuple[tensors_pb2.ModelHeader, list[bytes], bytes]] = {}
        self._keep = keep
        self._lock = threading.Lock()
        self.spec: tuple[TensorSpec, ...] = ()

    def put(self, header: tensors_pb2.ModelHeader, chunks: list[bytes], sha: bytes) -> None:
        """Store a version; drop the oldest but version 0 (late joiners pre-train from it)."""
        with self._lock:
            self._models[header.model_version] = (header, chunks, sha)
            self.spec = spec_from_pb(header.tensors)
            while len(self._models) > self._keep:
                oldest = min(v for v in self._models if v != 0)
                del self._models[oldest]

    def get(self, version: int) -> tuple[tensors_pb2.ModelHeader, list[bytes], bytes] | None:
        """A stored version (-1: the newest) or None."""
        with self._lock:
            if not self._models:
                return None
            v = max(self._models) if version < 0 else version
            return self._models.get(v)


def fetch_model(
    stub: agg_grpc.AggregatorStub, version: int, token: str | None, max_bytes: int
) -> tuple[tensors_pb2.ModelHeader, list[bytes], bytes]:
    """Download a version from the aggregator, validating it, keeping the encoded chunks."""
    header: tensors_pb2.ModelHeader | None = None
    reader: StreamReader | None = None
    chunks: list[bytes] = []
    sha = b""
    for msg in stub.GetModel(
        agg_pb.GetModelRequest(model_version=version), metadata=call_metadata(token)
    ):
        part = msg.WhichOneof("part")
        if part == "header":
            header = msg.header
            reader = StreamReader(spec_from_pb(header.tensors), keep=False, max_bytes=max_bytes)
        elif part == "data" and reader is not None:
            reader.feed(msg.data)
            chunks.append(msg.data)
        elif part == "trailer" and reader is not None:
            reader.finish(msg.trailer.sha256)
            sha = msg.trailer.sha256
    if header is None or not sha:
        raise RuntimeError(f"aggregator sent an incomplete model stream for version {version}")
    return header, chunks, sha


class Coordinator:
    """Runs the federation's rounds against the shared state."""

    def __init__(
        self,
        config: ClustererConfig,
        state: ClustererState,
        aggregator: agg_grpc.AggregatorStub,
        models: ModelCache,
        metrics: ClustererMetrics,
    ) -> None:
        self.metrics = metrics
        self.config = config
        self.state = state
        self.aggregator = aggregator
        self.models = models
        self.strategy = get_strategy(config.strategy)
        self.rng = np.random.default_rng(config.seed)
        metrics.rounds_total.set(config.rounds)
        metrics.round.set(-1)
        metrics.phase.state("waiting")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self.on_round: Callable[[dict[str, Any]], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the round protocol in its thread."""
        self.thread.start()

    def shutdown(self) -> None:
        """Stop after the current wait; wake everything that waits."""
        self.stop.set()
        with self.state.cond:
            self.state.cond.notify_all()

    def _run(self) -> None:
        try:
            self._refresh_model(0)
            self._wait_for_members()
            if self.strategy.clustered:
                self._pretrain_and_cluster()
            else:
                self._assign_without_clustering()
            status = with_retries(
                lambda: self.aggregator.GetAggregatorStatus(
                    agg_pb.GetAggregatorStatusRequest(), metadata=self._meta(), timeout=30
                ),
                "Aggregator.GetAggregatorStatus",
                stop=self.stop,
            )
            first = int(status.open_round)
            if status.pending_updates > 0:
                # A previous clusterer died mid-round: its half-collected round cannot be
                # completed fairly, so it is dropped and the next one starts clean.
                logger.warning(
                    "dropping interrupted round %d (%d updates)", first, status.pending_updates
                )
                self.aggregator.Aggregate(
                    agg_pb.AggregateRequest(
                        round=first, strategy=self.config.strategy, abandon=True
                    ),
                    metadata=self._meta(),
                    timeout=60,
                )
                first += 1
            if first > 0 or status.model_version > 0:
                # The aggregator kept its state over a restart: go on where it is.
                logger.info("resuming at round %d, model version %d", first, status.model_version)
                self._refresh_model(int(status.model_version))
                with self.state.cond:
                    self.state.model_version = int(status.model_version)
            for r in range(first, self.config.rounds):
                if self.stop.is_set():
                    return
                self._round(r)
            with self.state.cond:
                self._phase("done")
                for p in self.state.members:
                    self.state.tasks[p] = Task(
                        pb.TASK_KIND_DONE, self.config.rounds, self.state.model_version
                    )
                self.state.cond.notify_all()
            logger.info("federation done after %d rounds", self.config.rounds)
        except Exception as exc:  # the service stays up and reports the failure
            logger.exception("coordinator failed")
            with self.state.cond:
                self._phase("failed")
                self.state.error = f"{type(exc).__name__}: {exc}"
                self.state.cond.notify_all()

    # ---- helpers ---------------------------------------------------------------------
    def _phase(self, name: str) -> None:
        """Set the phase (cond held) and export it."""
        self.state.phase = name
        self.metrics.phase.state(name)

    def _meta(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.config.auth_token)

    def _refresh_model(self, version: int) -> None:
        if self.models.get(version) is not None and version != -1:
            return
        header, chunks, sha = with_retries(
            lambda: fetch_model(
                self.aggregator, version, self.config.auth_token, self.config.max_update_bytes
            ),
            "Aggregator.GetModel",
            attempts=12,
            stop=self.stop,
        )
        self.models.put(header, chunks, sha)
        with self.state.cond:
            self.state.model_version = max(self.state.model_version, header.model_version)

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait on the state's condition until done() or timeout; cond must be held."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or self.stop.is_set():
                return done()
            self.state.cond.wait(left)
        return True

    def _assign(self, tasks: dict[str, Task]) -> None:
        """Hand out tasks (cond held) and wake the long polls."""
        self.state.tasks.update(tasks)
        self.state.cond.notify_all()

    def _cancel(self, participants: Iterable[str], kind: int) -> list[str]:
        """Withdraw unfinished tasks of a kind (cond held); returns who had one."""
        missed = [
            p for p in participants if p in self.state.tasks and self.state.tasks[p].kind == kind
        ]
        for p in missed:
            del self.state.tasks[p]
            self.state.members[p].timeouts += 1
        return missed

    # ---- phases ----------------------------------------------------------------------
    def _wait_for_members(self) -> None:
        with self.state.cond:
            self._phase("waiting")
            while len(self.state.members) < self.config.participants and not self.stop.is_set():
                self.state.cond.wait(5.0)
        logger.info("%d participants joined", len(self.state.members))

    def _assign_without_clustering(self) -> None:
        with self.state.cond:
            for i, p in enumerate(sorted(self.state.members)):
                self.state.members[p].cluster = i if self.strategy.per_participant else 0

    def _pretrain_and_cluster(self) -> None:
        with self.state.cond:
            self._phase("pretraining")
            members = sorted(self.state.members)
            self._assign({p: Task(pb.TASK_KIND_PRETRAIN, -1, 0) for p in members})
            self._wait(
                lambda: all(p in self.state.pretrain_deltas for p in members),
                self.config.pretrain_timeout_s,
            )
            missed = self._cancel(members, pb.TASK_KIND_PRETRAIN)
            self.metrics.timed_out.labels("pretrain").inc(len(missed))
            have = sorted(self.state.pretrain_deltas)
            deltas = torch.stack([self.state.pretrain_deltas[p] for p in have])
            self._phase("clustering")
        k = None if self.config.clusters is None else min(self.config.clusters, len(have))
        with self.metrics.clustering_seconds.time():
            result = cluster(deltas, k=k, method=self.config.cluster_method, seed=self.config.seed)
        with self.state.cond:
            for p, c in zip(have, result.assignment.tolist(), strict=True):
                self.state.members[p].cluster = int(c)
            for c in range(result.k):
                self.state.centroids[c] = deltas[result.assignment == c].mean(dim=0)
            groups = np.array([self.state.members[p].group for p in have])
            if (groups >= 0).all():
                self.state.purity = purity(result.assignment, groups)
            self.metrics.purity.set(-1 if self.state.purity is None else self.state.purity)
            sizes = np.bincount(result.assignment, minlength=result.k)
            for c, size in enumerate(sizes.tolist()):
                self.metrics.cluster_size.labels(cluster_label(c)).set(size)
        logger.info(
            "clustered %d participants into k=%d (%s), silhouette %.3f, purity %s",
            len(have),
            result.k,
            result.k_from,
            result.score,
            self.state.purity,
        )

    def _evaluate(self, participants: list[str], tag: str) -> dict[str, Evaluation]:
        """Have participants evaluate the current model; wait for all or the deadline."""
        with self.state.cond:
            version = self.state.model_version
            self.state.evaluations[tag] = {}
            self._assign(
                {
                    p: Task(pb.TASK_KIND_EVALUATE, self.state.round, version, evaluation_id=tag)
                    for p in participants
                }
            )
            got = self.state.evaluations[tag]
            self._wait(lambda: all(p in got for p in participants), self.config.eval_timeout_s)
            missed = self._cancel(participants, pb.TASK_KIND_EVALUATE)
            self.metrics.timed_out.labels("evaluate").inc(len(missed))
            return dict(self.state.evaluations.pop(tag))

    def _round(self, r: int) -> None:
        start = time.monotonic()
        cfg = self.config
        with self.state.cond:
            self.state.round = r
            self.metrics.round.set(r)
            self._phase("selecting")
            active = self.state.active(cfg.liveness_s)
            self.metrics.active.set(len(active))
            labels = {
                p: self.state.members[p].cluster
                for p in active
                if self.state.members[p].cluster >= 0
            }
        pids = sorted(labels)
        if not pids:
            raise RuntimeError("no active, clustered participant is left")
        if self.strategy.per_participant:
            chosen = self.rng.choice(len(pids), min(cfg.select, len(pids)), replace=False)
            selected = {pids[i]: labels[pids[i]] for i in sorted(chosen)}
        else:
            picks = fair_select(
                np.array([labels[p] for p in pids]),
                max(cfg.select, len(set(labels.values()))),
                self.rng,
            )
            selected = {pids[i]: c for c, members in picks.items() for i in members}
        self.metrics.selected.set(len(selected))
        # Accuracy of the current global model per cluster, for the fair merge.
        cluster_acc: dict[int, float] = {}
        if r > 0 and self.strategy.merge == "accuracy":
            with self.state.cond:
                self._phase("evaluating")
            if self.strategy.per_participant:
                sample = list(selected)
            else:
                sample = []
                for c in sorted(set(selected.values())):
                    pool = [p for p in pids if labels[p] == c]
                    take = self.rng.choice(
                        len(pool), min(cfg.eval_per_cluster, len(pool)), replace=False
                    )
                    sample += [pool[i] for i in sorted(take)]
            evals = self._evaluate(sample, f"pre-{r}")
            for c in sorted(set(selected.values())):
                accs = [e.accuracy for p, e in evals.items() if labels.get(p) == c]
                if accs:
                    cluster_acc[c] = float(np.mean(accs))
                    self.metrics.cluster_accuracy.labels(cluster_label(c)).set(cluster_acc[c])
        # Training: collect updates until all selected answered or the deadline.
        with self.state.cond:
            self._phase("training")
            self.state.selected = dict(selected)
            self.state.received = set()
            self.state.collecting_round = r
            version = self.state.model_version
            self._assign({p: Task(pb.TASK_KIND_TRAIN, r, version) for p in selected})
            self._wait(lambda: self.state.received >= set(selected), cfg.round_timeout_s)
            self.state.collecting_round = None
            timed_out = self._cancel(selected, pb.TASK_KIND_TRAIN)
            self.metrics.timed_out.labels("train").inc(len(timed_out))
            received = len(self.state.received)
            self._phase("aggregating")
        needed = math.ceil(cfg.min_share * len(selected))
        abandon = received < needed
        if abandon:
            logger.warning(
                "round %d: %d of %d updates (need %d): model kept",
                r,
                received,
                len(selected),
                needed,
            )
        reply: agg_pb.AggregateResponse = with_retries(
            lambda: self.aggregator.Aggregate(
                agg_pb.AggregateRequest(
                    round=r,
                    strategy=cfg.strategy,
                    cluster_accuracy=cluster_acc,
                    q=cfg.q,
                    byzantine_fraction=cfg.byzantine_fraction,
                    lr=cfg.lr_at(r),
                    abandon=abandon,
                ),
                metadata=self._meta(),
                timeout=600,
            ),
            "Aggregator.Aggregate",
            stop=self.stop,
        )
        if reply.model_version != version:
            self._refresh_model(reply.model_version)
        with self.state.cond:
            self.state.model_version = reply.model_version
            everyone = self.state.active(cfg.liveness_s)
        evals = self._evaluate(everyone, f"post-{r}")
        record: dict[str, Any] = {
            "round": r,
            "model_version": reply.model_version,
            "selected": len(selected),
            "received": received,
            "timed_out": len(timed_out),
            "rejected": len(reply.rejected),
            "rejected_clusters": len(reply.rejected_clusters),
            "fallbacks": len(reply.fallbacks),
            "cluster_weights": {int(c): float(w) for c, w in reply.cluster_weights.items()},
            "evaluated": len(evals),
        }
        if evals:
            s = accuracy_summary([e.accuracy for e in evals.values()])
            record.update(
                mean_accuracy=s.mean,
                accuracy_std=s.std,
                worst_accuracy=s.worst,
                worst_decile_accuracy=s.worst_decile,
                mean_loss=float(np.mean([e.loss for e in evals.values()])),
            )
        else:
            record.update(
                mean_accuracy=0.0,
                accuracy_std=0.0,
                worst_accuracy=0.0,
                worst_decile_accuracy=0.0,
                mean_loss=0.0,
            )
        record["duration_s"] = time.monotonic() - start
        m = self.metrics
        m.round_seconds.observe(record["duration_s"])
        m.rounds_completed.inc()
        m.model_version.set(reply.model_version)
        m.accuracy_mean.set(record["mean_accuracy"])
        m.accuracy_std.set(record["accuracy_std"])
        m.accuracy_worst.set(record["worst_accuracy"])
        m.loss_mean.set(record["mean_loss"])
        for c, w in record["cluster_weights"].items():
            m.cluster_weight.labels(cluster_label(c)).set(w)
        with self.state.cond:
            self.state.history.append(record)
        if self.config.state_dir:
            self._save_history()
        with self.state.cond:
            self.state.cond.notify_all()
        logger.info(
            "round %d: accuracy %.3f (std %.3f), %d/%d updates, %d rejected, %.1fs",
            r,
            record["mean_accuracy"],
            record["accuracy_std"],
            received,
            len(selected),
            record["rejected"],
            record["duration_s"],
        )
        if self.on_round is not None:
            self.on_round(record)

    def _save_history(self) -> None:
        """Write the rounds so far and the clustering to state_dir/history.json."""
        directory = Path(self.config.state_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "history.json.tmp"
        tmp.write_text(json.dumps(self.state.snapshot(), default=float))
        tmp.replace(directory / "history.json")

    # ---- called by handlers (cond held) ----------------------------------------------
    def accept_pretrain_delta(self, participant: str, delta: torch.Tensor) -> None:
        """Store a pre-training delta (sketched when long); late joiners join a cluster."""
        if delta.numel() > SKETCH_ABOVE:
            delta = count_sketch(delta.unsqueeze(0), SKETCH_DIM, self.config.seed)[0]
        self.state.pretrain_deltas[participant] = delta
        member = self.state.members[participant]
        if self.state.centroids and member.cluster < 0:
            dist = {c: float((delta - v).norm()) for c, v in self.state.centroids.items()}
            member.cluster = min(dist, key=dist.__getitem__)
            logger.info("late participant %s joins cluster %d", participant, member.cluster)
        elif not self.strategy.clustered and member.cluster < 0:
            member.cluster = 0 if not self.strategy.per_participant else len(self.state.members) - 1
