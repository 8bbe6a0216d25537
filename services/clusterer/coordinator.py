"""The round protocol (ALGORITHM.md sections 2-7), run by one thread of the clusterer.

It waits for participants, has them pre-train, clusters them, and then each round: plans
the round (services.clusterer.plan), has the planned evaluators evaluate the global model
(for the q-weights), collects updates until everyone selected answered or the deadline
passed, has the aggregator aggregate, and has every participant evaluate the new model.
Every change of shared state goes through ClustererState's methods; nothing busy-waits.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.clusterer.clustering import group_deltas
from services.clusterer.metrics import ClustererMetrics
from services.clusterer.plan import group_accuracy, plan_round
from services.clusterer.settings import ClustererConfig
from services.clusterer.state import ClustererState, Evaluation
from services.common.errors import ConfigError
from services.common.figures import accuracy_summary
from services.common.grpc_client import IDEMPOTENT, RetryPolicy, call_metadata, with_retries
from services.common.metrics import cluster_label
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.strategies import get_strategy
from services.common.streams import read_encoded
from services.common.tensors import TensorSpec
from services.common.wire import spec_from_pb

logger = logging.getLogger(__name__)

EncodedModel = tuple[tensors_pb2.ModelHeader, list[bytes], bytes]


class ModelCache:
    """Encoded global models (header, chunks, checksum) by version, served to participants."""

    def __init__(self, keep: int = 3) -> None:
        self._models: dict[int, EncodedModel] = {}
        self._keep = keep
        self._lock = threading.Lock()
        self.spec: tuple[TensorSpec, ...] = ()

    def put(self, model: EncodedModel) -> None:
        """Store a version; drop the oldest but version 0 (late joiners pre-train from it)."""
        header = model[0]
        with self._lock:
            self._models[header.model_version] = model
            self.spec = spec_from_pb(header.tensors)
            while len(self._models) > self._keep:
                oldest = min(v for v in self._models if v != 0)
                del self._models[oldest]

    def get(self, version: int) -> EncodedModel | None:
        """A stored version (-1: the newest) or None."""
        with self._lock:
            if not self._models:
                return None
            v = max(self._models) if version < 0 else version
            return self._models.get(v)


def round_record(
    r: int,
    reply: agg_pb.AggregateResponse,
    selected: dict[str, int],
    received: int,
    timed_out: int,
    evals: dict[str, Evaluation],
) -> dict[str, Any]:
    """The history entry of a finished round."""
    record: dict[str, Any] = {
        "round": r,
        "model_version": reply.model_version,
        "selected": len(selected),
        "received": received,
        "timed_out": timed_out,
        "rejected": len(reply.rejected),
        "rejected_clusters": len(reply.rejected_clusters),
        "fallbacks": len(reply.fallbacks),
        "cluster_weights": {int(c): float(w) for c, w in reply.cluster_weights.items()},
        "evaluated": len(evals),
        "selection": dict(selected),
    }
    accs = [e.accuracy for e in evals.values()]
    s = accuracy_summary(accs) if accs else None
    record.update(
        mean_accuracy=s.mean if s else 0.0,
        accuracy_std=s.std if s else 0.0,
        worst_accuracy=s.worst if s else 0.0,
        worst_decile_accuracy=s.worst_decile if s else 0.0,
        mean_loss=float(np.mean([e.loss for e in evals.values()])) if evals else 0.0,
    )
    return record


class ClustererParts:
    """What the coordinator and the RPC servicer share: the settings, the state, the
    aggregator's stub, the cached global models and the metrics."""

    def __init__(
        self,
        config: ClustererConfig,
        state: ClustererState,
        aggregator: agg_grpc.AggregatorStub,
        models: ModelCache,
        metrics: ClustererMetrics,
        token: str | None,
    ) -> None:
        self.config = config
        self.state = state
        self.aggregator = aggregator
        self.models = models
        self.metrics = metrics
        self.token = token  # read once, by build_service


class Coordinator(ClustererParts):
    """Runs the federation's rounds against the clusterer's state."""

    def __init__(self, *parts: Any) -> None:  # ClustererParts' arguments
        super().__init__(*parts)
        self.fed = self.config.federation
        self.timing = self.config.transport
        self.strategy = get_strategy(self.fed.strategy)
        self.rng = np.random.default_rng(self.fed.seed)
        self.metrics.rounds_total.set(self.fed.rounds)
        self.metrics.round.set(-1)
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
            self._aggregator_status()  # the same strategy on both sides, before anyone waits
            self._refresh_model(0)
            self._wait_for_members()
            if self.strategy.clustered:
                self._pretrain_and_cluster()
            else:
                self.state.assign_static_groups()
            first = self._resume_point()
            for r in range(first, self.fed.rounds):
                if self.stop.is_set():
                    return
                self._round(r)
            self.state.finish(self.fed.rounds)
            logger.info("federation done after %d rounds", self.fed.rounds)
        except Exception as exc:  # the service stays up and reports the failure
            logger.exception("coordinator failed")
            self.state.fail(f"{type(exc).__name__}: {exc}")

    # ---- helpers ---------------------------------------------------------------------
    def _meta(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token)

    def _refresh_model(self, version: int) -> None:
        if self.models.get(version) is not None:
            return
        model = with_retries(
            lambda: read_encoded(
                self.aggregator.GetModel(
                    agg_pb.GetModelRequest(model_version=version),
                    metadata=self._meta(),
                    timeout=600,
                ),
                self.timing.max_update_bytes,
            ),
            "Aggregator.GetModel",
            RetryPolicy(attempts=12, codes=IDEMPOTENT.codes),
            stop=self.stop,
        )
        self.models.put(model)
        self.state.set_model_version(model[0].model_version)

    def _aggregator_status(self) -> agg_pb.GetAggregatorStatusResponse:
        """The aggregator's round, pending updates and defence policy (retried)."""
        status: agg_pb.GetAggregatorStatusResponse = with_retries(
            lambda: self.aggregator.GetAggregatorStatus(
                agg_pb.GetAggregatorStatusRequest(), metadata=self._meta(), timeout=30
            ),
            "Aggregator.GetAggregatorStatus",
            IDEMPOTENT,
            stop=self.stop,
        )
        if status.policy.strategy != self.fed.strategy:
            raise ConfigError(
                f"the aggregator runs strategy {status.policy.strategy!r}, this clusterer "
                f"{self.fed.strategy!r}: start both with the same --strategy"
            )
        return status

    def _resume_point(self) -> int:
        """The first round to run: where the aggregator is (it may have outlived us)."""
        status = self._aggregator_status()
        first = int(status.open_round)
        if status.pending_updates > 0:
            # A previous clusterer died mid-round: its half-collected round cannot be
            # completed fairly, so it is dropped and the next one starts clean.
            logger.warning(
                "dropping interrupted round %d (%d updates)", first, status.pending_updates
            )
            self.aggregator.Aggregate(
                agg_pb.AggregateRequest(round=first, abandon=True),
                metadata=self._meta(),
                timeout=60,
            )
            first += 1
        if first > 0 or status.model_version > 0:
            logger.info("resuming at round %d, model version %d", first, status.model_version)
            self._refresh_model(int(status.model_version))
        return first

    # ---- phases ----------------------------------------------------------------------
    def _wait_for_members(self) -> None:
        self.state.set_phase("waiting")
        self.state.wait_until(lambda: self.state.joined() >= self.fed.participants, None, self.stop)
        logger.info("%d participants joined", self.state.joined())

    def _pretrain_and_cluster(self) -> None:
        members = self.state.start_pretraining()
        self.state.wait_until(
            lambda: self.state.has_pretrained(members),
            self.timing.pretrain_timeout_s,
            self.stop,
        )
        missed = self.state.cancel(members, pb.TASK_KIND_PRETRAIN)
        self.metrics.timed_out.labels("pretrain").inc(len(missed))
        have, deltas = self.state.pretrained()
        if not have:
            raise RuntimeError("no participant sent a pre-training delta")
        self.state.set_phase("clustering")
        stacked = torch.stack(deltas)
        with self.metrics.clustering_seconds.time():
            fit, result = group_deltas(
                stacked, self.fed.clusters, self.config.clustering.cluster_method, self.fed.seed
            )
        refused = [p for p, ok in zip(have, fit.tolist(), strict=True) if not ok]
        if refused:
            logger.warning(
                "%d pre-training delta(s) refused (non-finite or too long): %s",
                len(refused),
                ", ".join(p[:64] for p in refused[:10]),
            )
            self.metrics.updates_rejected.labels("invalid_argument").inc(len(refused))
        have = [p for p, ok in zip(have, fit.tolist(), strict=True) if ok]
        stacked = stacked[fit]
        score = self.state.set_clusters(have, result.assignment, stacked)
        self.metrics.purity.set(-1 if score is None else score)
        for c, size in enumerate(np.bincount(result.assignment, minlength=result.k).tolist()):
            self.metrics.cluster_size.labels(cluster_label(c)).set(size)
        logger.info(
            "clustered %d participants into k=%d (%s), silhouette %.3f, purity %s",
            len(have),
            result.k,
            result.k_from,
            result.score,
            score,
        )

    def _evaluate(self, participants: list[str], tag: str) -> dict[str, Evaluation]:
        """Have participants evaluate the current model; wait for all or the deadline."""
        asked = self.state.start_evaluation(tag, participants)
        self.state.wait_until(
            lambda: self.state.evaluated(tag, asked), self.timing.eval_timeout_s, self.stop
        )
        missed = self.state.cancel(asked, pb.TASK_KIND_EVALUATE)
        self.metrics.timed_out.labels("evaluate").inc(len(missed))
        return self.state.finish_evaluation(tag)

    def _round(self, r: int) -> None:
        start = time.monotonic()
        self.state.start_round(r)
        self.metrics.round.set(r)
        groups = self.state.active_groups(self.timing.liveness_s)
        self.metrics.active.set(len(groups))
        if not groups:
            raise RuntimeError("no active, clustered participant is left")
        plan = plan_round(
            self.strategy, groups, r, self.fed.select, self.fed.eval_per_cluster, self.rng
        )
        self.metrics.selected.set(len(plan.selected))
        cluster_acc: dict[int, float] = {}
        if plan.evaluators:
            self.state.set_phase("evaluating")
            evals = self._evaluate(list(plan.evaluators), f"pre-{r}")
            cluster_acc = group_accuracy(
                {p: e.accuracy for p, e in evals.items()}, groups, plan.selected
            )
            for c, acc in cluster_acc.items():
                self.metrics.cluster_accuracy.labels(cluster_label(c)).set(acc)
        # Training: collect updates until all selected answered or the deadline.
        self.state.open_round(r, plan.selected)
        version = self.state.model_version
        self.state.wait_until(self.state.all_received, self.timing.round_timeout_s, self.stop)
        received, timed_out = self.state.close_round()
        self.metrics.timed_out.labels("train").inc(len(timed_out))
        needed = math.ceil(self.fed.min_share * len(plan.selected))
        abandon = received < needed
        if abandon:
            logger.warning(
                "round %d: %d of %d updates (need %d): model kept",
                r,
                received,
                len(plan.selected),
                needed,
            )
        reply: agg_pb.AggregateResponse = with_retries(
            lambda: self.aggregator.Aggregate(
                agg_pb.AggregateRequest(round=r, cluster_accuracy=cluster_acc, abandon=abandon),
                metadata=self._meta(),
                timeout=600,
            ),
            "Aggregator.Aggregate",
            stop=self.stop,
        )
        if reply.model_version != version:
            self._refresh_model(reply.model_version)
        everyone = list(self.state.active_groups(self.timing.liveness_s))
        evals = self._evaluate(everyone, f"post-{r}")
        record = round_record(r, reply, plan.selected, received, len(timed_out), evals)
        record["duration_s"] = time.monotonic() - start
        self._export(record)
        self.state.record_round(record)
        if self.config.service.state_dir:
            self._save_history()
        logger.info(
            "round %d: accuracy %.3f (std %.3f), %d/%d updates, %d rejected, %.1fs",
            r,
            record["mean_accuracy"],
            record["accuracy_std"],
            received,
            len(plan.selected),
            record["rejected"],
            record["duration_s"],
        )
        if self.on_round is not None:
            self.on_round(record)

    def _export(self, record: dict[str, Any]) -> None:
        m = self.metrics
        m.round_seconds.observe(record["duration_s"])
        m.rounds_completed.inc()
        m.model_version.set(record["model_version"])
        m.accuracy_mean.set(record["mean_accuracy"])
        m.accuracy_std.set(record["accuracy_std"])
        m.accuracy_worst.set(record["worst_accuracy"])
        m.loss_mean.set(record["mean_loss"])
        for c, w in record["cluster_weights"].items():
            m.cluster_weight.labels(cluster_label(c)).set(w)

    def _save_history(self) -> None:
        """Write the rounds so far and the clustering to state_dir/history.json."""
        directory = Path(self.config.service.state_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "history.json.tmp"
        tmp.write_text(json.dumps(self.state.snapshot(), default=float))
        tmp.replace(directory / "history.json")
