"""The round protocol (docs/algorithm.md, sections 2-7), run by one thread of the clusterer.

It waits for participants, has them pre-train, clusters them, and then each round: plans
the round (services.core.plan), has the planned evaluators evaluate the global model
(for the q-weights), collects updates until everyone selected answered or the deadline
passed, has the aggregator aggregate, and has every participant evaluate the new model.
Every change of shared state goes through ClustererState's methods; nothing busy-waits.

With --state-dir the state is durable (services/clusterer/store.py) and a restarted
clusterer resumes where the killed one stopped: the members it knew, the phase it was in,
the round in flight with the same plan, the updates the aggregator acknowledged, and the
aggregator's answer if it had one (Aggregate is idempotent). No round is dropped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from google.protobuf.json_format import MessageToDict, ParseDict

from services.clusterer.buffering import BufferedRounds
from services.clusterer.collection import accuracy_fields
from services.clusterer.metrics import ClustererMetrics
from services.clusterer.settings import ClustererConfig
from services.clusterer.state import ClustererState, Evaluation, RoundProgress
from services.clusterer.store import ClustererStore
from services.common.figures import accuracy_summary, group_means, rejections_by_layer
from services.common.metrics import cluster_label
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import read_encoded
from services.common.wire import spec_from_pb
from services.core.accountant import Ledger, Step
from services.core.clustering import MinCluster, group_deltas
from services.core.errors import ConfigError, StateError
from services.core.plan import evaluation_sample, group_accuracy, plan_round
from services.core.privacy import expected_counts
from services.core.quarantine import Judgement, judge
from services.core.record import RoundRecord
from services.core.robust import rule_minimum
from services.core.selection import poisson_rates
from services.core.strategies import get_strategy
from services.core.tensors import TensorSpec
from services.transport.client import IDEMPOTENT, RetryPolicy, call_metadata, with_retries

logger = logging.getLogger(__name__)
CUT_WAIT_S = 30.0  # for a cut upload's handler to release its reservation

# A model version as served: its header and its stream's messages, serialized.
EncodedModel = tuple[tensors_pb2.ModelHeader, list[bytes]]
# The aggregator may be restarting (a pod rescheduled): keep asking for a while. Every call
# the coordinator makes is safe to repeat, Aggregate included.
AGGREGATOR_RETRY = RetryPolicy(attempts=1 << 20, codes=IDEMPOTENT.codes, budget_s=900.0)
PEEK_S = 5.0  # while collecting, how often the aggregator's acknowledged list is read
PHASES = ("evaluate", "train", "upload", "aggregate", "publish")


def _load_clustering(method: str) -> None:
    """Import what clustering imports on first use: SciPy's hierarchy for Ward (0.4 s of
    CPU), scikit-learn for k-means and DBSCAN (2 s)."""
    import scipy.cluster.hierarchy  # noqa: F401

    if method != "hierarchical":
        import sklearn.cluster  # noqa: F401


class Stopped(Exception):
    """The service is stopping: the protocol ends where it is (a restart resumes it)."""


class Diverging(Exception):
    """Round after round was rolled back: the federation stops with its last good model."""


# Rounds in a row rolled back before the federation stops. Tracing one forger among n
# suspects costs about log2(n) + 1 failed rounds, not all of them in a row.
MAX_ROLLBACKS = 10


class ModelCache:
    """Encoded global models (header, chunks, checksum) by version, served to participants;
    with --personalise each version's cluster models beside its global one."""

    def __init__(self, keep: int = 3) -> None:
        self._models: dict[int, EncodedModel] = {}
        self._clusters: dict[int, dict[int, EncodedModel]] = {}
        self._keep = keep
        self._pinned: set[int] = set()  # versions an evaluation in progress still names
        self._lock = threading.Lock()
        self.spec: tuple[TensorSpec, ...] = ()
        # Set once version 0 is here: the clusterer says it serves only then, so a
        # participant that downloads w0 the moment the ready file appears finds it.
        self.initial = threading.Event()

    def put(self, model: EncodedModel, cluster: int | None = None) -> None:
        """Store a version (or a cluster's model of it); drop the oldest version but 0
        (late joiners pre-train from it), with its cluster models."""
        header = model[0]
        with self._lock:
            if cluster is not None:
                self._clusters.setdefault(header.model_version, {})[cluster] = model
                return
            self._models[header.model_version] = model
            if header.kind in ("", "weights"):  # an encrypted version lists ciphertexts
                self.spec = spec_from_pb(header.tensors)
            while len(self._models) > self._keep + len(self._pinned & set(self._models)):
                oldest = min(v for v in self._models if v != 0 and v not in self._pinned)
                del self._models[oldest]
                self._clusters.pop(oldest, None)
        if header.model_version == 0:
            self.initial.set()

    def pin(self, version: int, pinned: bool = True) -> None:
        """Keep `version` (while an evaluation of it is under way: --mode async), or let it
        go again (`pinned` False)."""
        with self._lock:
            if pinned:
                self._pinned.add(version)
            else:
                self._pinned.discard(version)

    def get(self, version: int, cluster: int | None = None) -> EncodedModel | None:
        """A stored version (-1: the newest), or a cluster's model of it, or None."""
        with self._lock:
            if not self._models:
                return None
            v = max(self._models) if version < 0 else version
            if cluster is not None:
                return self._clusters.get(v, {}).get(cluster)
            return self._models.get(v)


def round_record(
    r: int,
    reply: agg_pb.AggregateResponse,
    progress: RoundProgress,
    evals: dict[str, Evaluation],
    groups: Mapping[str, int] | None = None,
    clusters: Mapping[str, int] | None = None,
) -> RoundRecord:
    """The history entry of a finished round ("updates": what the aggregator aggregated,
    equal to "received" unless the round was abandoned)."""
    personal = {p: e.personal_accuracy for p, e in evals.items() if e.personal_accuracy is not None}
    ps = accuracy_summary(list(personal.values())) if personal else None
    return RoundRecord(
        round=r,
        model_version=reply.model_version,
        selected=len(progress.selected),
        received=len(progress.received),
        updates=int(reply.updates),
        abandoned=progress.abandon,
        timed_out=len(progress.timed_out),
        rejected=len(reply.rejected),
        rejected_by=rejections_by_layer(r.reason for r in reply.rejected),
        rejected_clusters=len(reply.rejected_clusters),
        fallbacks=len(reply.fallbacks),
        cluster_weights={int(c): float(w) for c, w in reply.cluster_weights.items()},
        selection=dict(progress.selected),
        # Seconds per phase (those this process ran: a restart mid-round misses the earlier
        # ones). "upload" is the slowest accepted upload stream, a part of "train".
        phases={p: round(progress.phases.get(p, 0.0), 6) for p in PHASES},
        # The figures of the new model's evaluation; group_accuracy is per ground-truth
        # group the participants reported (simulations).
        **accuracy_fields(evals, groups or {}, clusters or {}),
        # --personalise: the model each participant serves, its cluster's
        personal_mean_accuracy=ps.mean if ps else None,
        personal_accuracy_std=ps.std if ps else None,
        personal_worst_accuracy=ps.worst if ps else None,
        personal_group_accuracy=group_means(personal, groups or {}) if ps else None,
        personal_cluster_accuracy=group_means(personal, clusters or {}) if ps else None,
    )


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
        self.token = token  # read once, by credentials() in build_service


class Coordinator(ClustererParts):
    """Runs the federation's rounds against the clusterer's state."""

    def __init__(self, *parts: Any) -> None:  # ClustererParts' arguments
        super().__init__(*parts)
        self.fed = self.config.federation
        self.timing = self.config.transport
        self.strategy = get_strategy(self.fed.strategy)
        self._byzantine_fraction = 0.2  # the aggregator's, once its status is read
        self.rng = np.random.default_rng(self.fed.seed)
        self.metrics.rounds_total.set(self.fed.rounds)
        self.metrics.round.set(-1)
        for phase in PHASES:  # every series exists from the first scrape
            self.metrics.phase_seconds.labels(phase)
        for verdict in ("ok", "refused", "diverged"):
            self.metrics.verdicts.labels(verdict)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self.on_round: Callable[[RoundRecord], None] | None = None
        # The newest published model version and everyone's evaluation of it.
        self.published: tuple[int, dict[str, Evaluation]] = (-1, {})
        state_dir = self.config.service.state_dir
        # Restored here, before the server answers anyone: known members never see NOT_FOUND.
        fed = self.fed
        experiment = {
            "strategy": fed.strategy,
            "seed": fed.seed,
            "clusters": fed.clusters,
            "select": fed.select,
            "eval_per_cluster": fed.eval_per_cluster,
            "cluster_method": self.config.clustering.cluster_method,
        }
        privacy = self.config.privacy
        if privacy.dp != "off":  # a ledger continued under another mechanism would be wrong
            # (without DP the keys are absent: a state written before they existed matches)
            experiment |= {"dp": privacy.dp, "dp_noise": privacy.dp_noise}
            experiment["dp_delta"] = privacy.dp_delta
        self.restored = bool(state_dir) and self.state.attach(
            ClustererStore(Path(state_dir or ".")), self.rng, experiment
        )

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
        """The protocol from wherever the (restored) state stands."""
        try:
            # The same strategy on both sides, before anyone waits; the aggregator's share
            # of attackers sizes the smallest cluster its rule defends.
            self._byzantine_fraction = self._aggregator_status().policy.byzantine_fraction
            self._refresh_model(0)
            if self.restored:
                self._restore_model()
            stage = self.state.stage
            if stage == "waiting":
                if self.strategy.clustered:  # the clustering code loads while members join
                    method = self.config.clustering.cluster_method
                    threading.Thread(target=_load_clustering, args=(method,), daemon=True).start()
                self._wait_for_members()
            if stage in ("waiting", "pretraining", "clustering"):
                if self.strategy.clustered:
                    self._pretrain_and_cluster()
                else:
                    self.state.assign_static_groups()
            if self.fed.personalise:  # the clusters are known now: serve their models
                self._refresh_model(self.state.model_version)
            if self.config.pace.asynchronous:
                BufferedRounds(self).run()
                return
            first = self._resume_point()
            for r in range(first, self.fed.rounds):
                if self.stop.is_set():
                    return
                spent = self._budget_spent(r)
                if spent:
                    logger.warning("stopping before round %d: %s", r, spent)
                    self.state.finish(r, f"stopped before round {r}: {spent}")
                    return
                self._round(r)
            self.state.finish(self.fed.rounds)
            logger.info("federation done after %d rounds", self.fed.rounds)
        except Stopped:
            logger.info("coordinator stopped")
        except Diverging as exc:
            logger.error("federation stopped: %s", exc)
            self.state.fail(str(exc))
        except Exception as exc:  # the service stays up and reports the failure
            if self.stop.is_set():
                logger.info("coordinator stopped (%s)", type(exc).__name__)
                return
            logger.exception("coordinator failed")
            self.state.fail(f"{type(exc).__name__}: {exc}")

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait on the state; a stopping service ends the protocol here, its state kept
        as the last phase change left it (a restart resumes from there)."""
        ok = self.state.wait_until(done, timeout, self.stop)
        if self.stop.is_set():
            raise Stopped
        return ok

    # ---- helpers ---------------------------------------------------------------------
    def _meta(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token)

    def _ask_aggregator(self, method: str, request: Any, timeout: float, **options: Any) -> Any:
        """The answer of the aggregator's unary `method` to request, retried (the calls
        are idempotent there) until it answers, a code is not retryable or the clusterer
        stops."""
        call = getattr(self.aggregator, method)
        return with_retries(
            lambda: call(request, metadata=self._meta(), timeout=timeout, **options),
            f"Aggregator.{method}",
            AGGREGATOR_RETRY,
            stop=self.stop,
        )

    def _refresh_model(self, version: int) -> None:
        """Have version in the cache participants download from (personalised: with each
        cluster's model of it); it is the current one."""
        if self.models.get(version) is None:
            self._fetch_model(version)
        if self.fed.personalise:
            for c in self.state.cluster_ids():
                if self.models.get(version, c) is None:
                    self._fetch_model(version, c)
        self.state.set_model_version(version)

    def _fetch_model(self, version: int, cluster: int | None = None) -> None:
        """Fetch a model version (or a cluster's model of it) from the aggregator."""
        request = agg_pb.GetModelRequest(model_version=version, cluster=cluster)
        model = with_retries(
            lambda: read_encoded(
                self.aggregator.GetModel(request, metadata=self._meta(), timeout=600),
                agg_pb.GetModelResponse,
                self.timing.max_update_bytes,
            ),
            "Aggregator.GetModel",
            AGGREGATOR_RETRY,
            stop=self.stop,
        )
        if model[0].model_version != version:  # the aggregator moved on meanwhile
            raise StateError(
                f"asked the aggregator for version {version}, got {model[0].model_version}"
            )
        self.models.put(model, cluster)

    def _restore_model(self) -> None:
        """Serve the restored state's model version again; the gauges show where it is."""
        version = self.state.model_version
        self.metrics.round.set(self.state.round)
        self.metrics.model_version.set(version)
        try:
            self._refresh_model(version)
        except grpc.RpcError as exc:
            # The aggregator moved on (it aggregated the round this state was closing and
            # keeps only its newest model): the answer to Aggregate brings the new one.
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            logger.info("model version %d is gone at the aggregator", version)

    def _aggregator_status(self) -> agg_pb.GetAggregatorStatusResponse:
        """The aggregator's round, pending updates and defence policy (retried). An
        aggregator still starting is waited for on the channel (wait_for_ready), so the
        call goes out as soon as it connects, not after the next step of a retry backoff."""
        status: agg_pb.GetAggregatorStatusResponse = self._ask_aggregator(
            "GetAggregatorStatus",
            agg_pb.GetAggregatorStatusRequest(),
            timeout=30,
            wait_for_ready=True,
        )
        if status.policy.strategy != self.fed.strategy:
            raise ConfigError(
                f"the aggregator runs strategy {status.policy.strategy!r}, this clusterer "
                f"{self.fed.strategy!r}: start both with the same --strategy"
            )
        if status.policy.personalise != self.fed.personalise:
            raise ConfigError(
                f"the aggregator runs with --personalise {str(status.policy.personalise).lower()}"
                f", this clusterer with {str(self.fed.personalise).lower()}: start both alike"
            )
        if status.policy.guard != self.fed.guard:
            raise ConfigError(
                f"the aggregator runs with --guard {str(status.policy.guard).lower()}, this "
                f"clusterer with {str(self.fed.guard).lower()}: start both alike"
            )
        if (status.policy.mode or "sync") != self.config.pace.mode:
            raise ConfigError(
                f"the aggregator runs --mode {status.policy.mode or 'sync'}, this clusterer "
                f"--mode {self.config.pace.mode}: start both alike"
            )
        if (status.policy.secure or "none") != self.fed.secure:
            raise ConfigError(
                f"the aggregator runs with --secure {status.policy.secure[:32] or 'none'!r}, this "
                f"clusterer with {self.fed.secure}: start both alike"
            )
        return status

    def _acknowledged(self, r: int, patient: bool = True) -> list[str]:
        """Who the aggregator holds an update from in round r: it acknowledged each only
        once durable, so its list is the truth about what this clusterer forwarded.
        Impatient: one try, and an unreachable aggregator holds nobody (a peek while
        collecting)."""
        if patient:
            status = self._aggregator_status()
        else:
            try:
                status = self.aggregator.GetAggregatorStatus(
                    agg_pb.GetAggregatorStatusRequest(), metadata=self._meta(), timeout=5
                )
            except grpc.RpcError:
                return []
        return list(status.pending_participants) if status.open_round == r else []

    def _resume_point(self) -> int:
        """The first round to run: the one this clusterer's record says, checked against
        the aggregator's; without a record, the aggregator's round."""
        status = self._aggregator_status()
        at = int(status.open_round)
        record = self.state.next_step()
        if record is not None:
            mine, step = record
            # Aggregate may have been answered (and the answer lost) once a round closed.
            ok = {"aggregating": (mine, mine + 1), "aggregated": (mine + 1,)}.get(step, (mine,))
            if at not in ok:
                raise StateError(
                    f"the aggregator is at round {at}, this clusterer's state "
                    f"({self.config.service.state_dir}) at round {mine} ({step}): they are not "
                    "the same federation (the aggregator lost its state, or the directory "
                    "holds an earlier run's: remove it to start a new one)"
                )
            if mine > 0 or at > 0:
                logger.info("resuming at round %d (%s), aggregator at round %d", mine, step, at)
            return mine
        first = at
        if status.pending_updates > 0:
            # Only for a round this clusterer has no record of (it keeps no state, or its
            # state directory was wiped): it does not know whom that round selected, so the
            # round cannot be completed fairly; it is dropped and the next starts clean. A
            # clusterer with its state never takes this path.
            logger.warning(
                "dropping interrupted round %d (%d updates) this clusterer has no record of",
                first,
                status.pending_updates,
            )
            self._ask_aggregator(
                "Aggregate", agg_pb.AggregateRequest(round=first, abandon=True), timeout=60
            )
            first += 1
        if first > 0 or status.model_version > 0:
            logger.info("resuming at round %d, model version %d", first, status.model_version)
            self._refresh_model(int(status.model_version))
        return first

    # ---- phases ----------------------------------------------------------------------
    def _wait_for_members(self) -> None:
        joined = self.state.gather(self.fed.participants, self._wait)
        logger.info("%d participants joined", joined)

    def _pretrain_and_cluster(self) -> None:
        """Pre-train (after a restart: only members without a delta) and cluster."""
        if self.state.stage != "clustering":
            began = time.monotonic()
            members, missed = self.state.pretrain(self._wait, self.timing.pretrain_timeout_s)
            self.metrics.timed_out.labels("pretrain").inc(len(missed))
            logger.info(
                "pre-training: %d of %d deltas in %.2fs",
                len(members) - len(missed),
                len(members),
                time.monotonic() - began,
            )
        have, deltas = self.state.begin_clustering()
        if not have:
            raise RuntimeError("no participant sent a pre-training delta")
        stacked = torch.stack(deltas)
        began = time.monotonic()
        fit, result = group_deltas(
            stacked,
            self.fed.clusters,
            self.config.clustering.cluster_method,
            self.fed.seed,
            min_size=MinCluster(
                rule_minimum(self.strategy.rule, self._byzantine_fraction),
                self.config.clustering.min_cluster,
            ),
        )
        took = time.monotonic() - began
        self.metrics.clustering_seconds.observe(took)
        refused = [p for p, ok in zip(have, fit.tolist(), strict=True) if not ok]
        if refused:
            logger.warning(
                "%d pre-training delta(s) refused (non-finite, too long or a near-twin): %s",
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
            "clustered %d participants in %.2fs into k=%d (%s), silhouette %.3f, purity %s",
            len(have),
            took,
            result.k,
            result.k_from,
            result.score,
            score,
        )

    def _evaluate(self, participants: list[str], tag: str) -> dict[str, Evaluation]:
        """Have participants evaluate the current model; wait for all or the deadline."""
        results, missed = self.state.evaluate(
            tag, participants, self._wait, self.timing.eval_timeout_s
        )
        self.metrics.timed_out.labels("evaluate").inc(len(missed))
        return results

    # ---- differential privacy (--dp central) -------------------------------------------
    def _dp_rates(self) -> dict[int, float] | None:
        """Each cluster's Poisson rate, from the sizes of the clusters of every member (the
        membership is public under zero-out adjacency; an inactive member drawn is simply
        not asked, as a dropout would be). None without --dp central."""
        if not self.config.privacy.central:
            return None
        return poisson_rates(self._sizes(), self.fed.select)

    def _sizes(self) -> dict[int, int]:
        """How many members each cluster has (the unclustered left out)."""
        sizes: dict[int, int] = {}
        for c in self.state.clusters_of(self.state.member_ids()).values():
            if c >= 0:
                sizes[c] = sizes.get(c, 0) + 1
        return sizes

    def _ledger(self) -> Ledger:
        p = self.config.privacy
        return Ledger(p.dp_delta, p.dp_epsilon, self.state.privacy_steps())

    def _step(self) -> list[Step]:
        rates = self._dp_rates()
        assert rates is not None
        return [Step(self.config.privacy.dp_noise, max(rates.values()))]

    def _budget_spent(self, r: int) -> str:
        """Why round r may not start (the privacy budget), "" when it may. A round already
        in flight (restored) finishes: its noise may have been drawn."""
        if not self.config.privacy.central or self.config.privacy.dp_epsilon is None:
            return ""
        flight = self.state.progress  # only the coordinator changes it
        if flight is not None and flight.round == r and flight.step != "planned":
            return ""
        return self._ledger().refuses(self._step())

    def _privacy_record(self, reply: agg_pb.AggregateResponse) -> dict[str, Any]:
        """The round record's privacy fields, and epsilon exported. A round the aggregator
        abandoned (too few updates, or none drawn) released nothing and spends nothing: its
        record carries the epsilon spent so far."""
        if not self.config.privacy.central:
            return {}
        if not reply.HasField("privacy"):
            return {"epsilon": self._ledger().epsilon}
        step = self._step()[0]
        epsilon = self._ledger().after([step])
        self.metrics.dp_epsilon.set(epsilon)
        return {
            "epsilon": epsilon,
            "dp_noise": step.noise,
            "dp_rate": step.rate,
            "dp_clip": reply.privacy.clip,
            "dp_sigma": reply.privacy.sigma,
            "dp_clipped": int(reply.privacy.clipped),
        }

    def _plan(
        self, r: int, active: int, groups: dict[str, int]
    ) -> tuple[dict[str, int], tuple[str, ...]]:
        """Select and choose evaluators once among the selectable active members (the state
        makes the plan durable before anyone is asked): (selected, evaluators)."""
        self.metrics.active.set(active)
        if not active:
            raise RuntimeError("no active, clustered participant is left")
        plan = plan_round(
            self.strategy,
            groups,
            r,
            self._selecting(),
            self.fed.eval_per_cluster,
            self.rng,
            self._dp_rates(),
        )
        return plan.selected, plan.evaluators

    def _selecting(self) -> int:
        """How many a round selects: --select, and over-selected the share more (the round
        closes at the first --select updates: the slowest devices are not waited for)."""
        return math.ceil(self.fed.select * (1.0 + self.config.pace.over_select) - 1e-9)

    def _enough(self) -> int | None:
        """Over-selected: the updates a round closes at (None: it waits for all)."""
        return self.fed.select if self.config.pace.over_select > 0 else None

    def _pre_evaluate(self, r: int, progress: RoundProgress) -> dict[int, float]:
        """The accuracy of the current model per selected cluster: the median over every
        member that evaluated it when it was published and the planned evaluators."""
        if not progress.evaluators:
            return {}
        # Everyone (past --eval-sample: a sample) evaluated this version when it was
        # published. All of a cluster's members count, not only the planned few: the
        # median of more reports is what a minority of lying evaluators cannot move
        # (plan.group_accuracy). Planned evaluators without a result from then (new, or
        # after a restart) are asked.
        version, known = self.published
        if version != self.state.model_version:
            known = {}
        wanted = set(progress.selected.values())
        evals = {p: known[p] for p, c in self.state.clusters_of(known).items() if c in wanted}
        evals |= {p: known[p] for p in progress.evaluators if p in known}
        missing = [p for p in progress.evaluators if p not in evals]
        if missing:
            evals |= self._evaluate(missing, f"pre-{r}")
        accuracy = {p: e.accuracy for p, e in evals.items() if e.verdict == "ok"}
        return group_accuracy(accuracy, self.state.clusters_of(evals), progress.selected)

    def _collect(self, r: int, progress: RoundProgress) -> None:
        """Collect updates until all selected answered or the deadline, let the uploads
        under way finish, and close the round with what the aggregator holds."""
        # While collecting: an update the aggregator kept but whose answer was lost (it died
        # answering) is refused as a duplicate when resent: count it from the aggregator's
        # list, read every PEEK_S.
        self.state.collect(
            r,
            self._wait,
            self.timing.round_timeout_s,
            PEEK_S,
            lambda: self._acknowledged(r, patient=False),
        )
        # An upload under way may still be acknowledged by the aggregator: wait for it
        # (streams are cut when idle or too long), so that what the aggregator holds when
        # asked below is all the round gets.
        self.state.settle_uploads(
            self._wait,
            self.timing.stream_idle_s,
            CUT_WAIT_S,
            lambda cut: logger.warning("round %d: cut %d upload(s) still streaming", r, cut),
        )
        wanted = min(len(progress.selected), self._enough() or len(progress.selected))
        needed = math.ceil(self.fed.min_share * wanted)
        self.state.close_round(self._acknowledged(r), needed)
        self.metrics.timed_out.labels("train").inc(len(progress.timed_out))
        self.metrics.stragglers.inc(len(progress.timed_out))
        if progress.abandon:
            logger.warning(
                "round %d: %d of %d updates (need %d): model kept",
                r,
                len(progress.received),
                len(progress.selected),
                needed,
            )

    def _aggregate(self, r: int, progress: RoundProgress) -> None:
        """Have the aggregator aggregate round r (idempotent there: a repeated call after a
        restart gets the same answer) and keep its answer."""
        request = agg_pb.AggregateRequest(
            round=r, cluster_accuracy=progress.cluster_accuracy, abandon=progress.abandon
        )
        rates = self._dp_rates()
        if rates is not None and not progress.abandon:
            sizes = {c: n for c, n in self._sizes().items() if c in rates}
            request.privacy.noise_multiplier = self.config.privacy.dp_noise
            request.privacy.expected.update(expected_counts(sizes, rates))
        reply: agg_pb.AggregateResponse = self._ask_aggregator("Aggregate", request, timeout=600)
        self.state.aggregated(r, MessageToDict(reply, preserving_proto_field_name=True))

    def _round(self, r: int) -> None:
        """Round r from its start, or from the step a restored state reached."""
        progress, resumed = self.state.begin_round(
            r, self.timing.liveness_s, lambda active, groups: self._plan(r, active, groups)
        )
        if resumed:
            logger.info("round %d: resuming at step %s", r, progress.step)
        self.metrics.round.set(r)
        self.metrics.selected.set(len(progress.selected))
        began = time.monotonic()
        if progress.step == "planned":
            accuracy = self._pre_evaluate(r, progress)
            began = self._took(r, "evaluate", began)
            self.state.open_round(r, accuracy, self._enough())
        elif progress.step == "training":
            rest = self.state.reopen_round(r, self._acknowledged(r), self._enough())
            logger.info("round %d: training again for %d participant(s)", r, len(rest))
        if progress.step == "training":
            self._collect(r, progress)
            began = self._took(r, "train", began)
        if progress.step == "aggregating":
            self._aggregate(r, progress)
            began = self._took(r, "aggregate", began)
        self._finish_round(r, progress, began)

    def _rollback(
        self, r: int, progress: RoundProgress, reason: str, judgement: Judgement | None
    ) -> int:
        """Have the aggregator publish a copy of the round's base version (idempotent
        there; the answer is saved before anything else happens; judgement, when new, is
        saved before it is asked); the new version."""
        request = agg_pb.RollbackRequest(
            round=r, to_version=progress.base_version, reason=reason[:200]
        )

        def ask() -> dict[str, Any]:
            reply: agg_pb.RollbackResponse = self._ask_aggregator("Rollback", request, timeout=60)
            return MessageToDict(reply, preserving_proto_field_name=True)

        saved, asked = self.state.roll_back(r, judgement, ask)
        if asked:
            self.metrics.rollbacks.inc()
        answer = ParseDict(saved or {}, agg_pb.RollbackResponse())
        logger.warning(
            "round %d: %s: rolled back; version %d is a copy of version %d",
            r,
            reason,
            answer.model_version,
            progress.base_version,
        )
        self._refresh_model(int(answer.model_version))
        return int(answer.model_version)

    def _took(self, r: int, phase: str, began: float) -> float:
        """Note the phase that began at `began` as done now; the time it ended."""
        now = time.monotonic()
        self.state.phase_took(r, phase, now - began)
        return now

    def _finish_round(self, r: int, progress: RoundProgress, began: float) -> None:
        """Serve the new model, have everyone (past --eval-sample: a sample) evaluate it
        (after a restart: the same participants as before), and record the round."""
        reply = ParseDict(progress.reply or {}, agg_pb.AggregateResponse())
        version = int(reply.model_version)
        judged = progress.judgement
        evals: dict[str, Evaluation] = {}
        new_judgement: Judgement | None = None
        if judged is None:  # not judged before a restart: serve the new version, evaluate it
            self._refresh_model(version)
            tag = f"post-{r}"
            asked = self.state.evaluators(
                tag,
                self.timing.liveness_s,
                lambda groups: evaluation_sample(groups, self.fed.eval_sample, self.fed.seed, r),
            )
            evals = self._evaluate(asked, tag)
            before_version, before_evals = self.published
            before = {}
            if self.fed.guard and before_version == progress.base_version:  # each vs itself
                before = {p: e.accuracy for p, e in before_evals.items()}
            judged = judge(evals, before)
            if judged.collapsed and 0 <= progress.base_version < version:
                # Saved before the aggregator is asked: a restart rolls back without
                # judging the bad version again (its evaluations are gone by then).
                new_judgement = judged
        counted = {p: e for p, e in evals.items() if e.verdict == "ok"}
        if judged.collapsed and 0 <= progress.base_version < version:
            before_version, before_evals = self.published
            version = self._rollback(r, progress, judged.reason, new_judgement)
            # The copy's evaluations are the last good version's, when this process has them.
            kept = before_evals if before_version == progress.base_version else {}
            self.published = (version, kept)
            counted = dict(kept)  # the round's figures are those of the model it ends with
        else:
            if judged.collapsed:
                logger.error(
                    "round %d: %s, but the round made no new version to roll back", r, judged.reason
                )
            self.published = (version, counted)
        self._took(r, "publish", began)
        record = round_record(
            r, reply, progress, counted, self.state.true_groups(), self.state.clusters_of(counted)
        )
        rolled_back = version != int(reply.model_version)
        failed: dict[int, int] | None = None
        if rolled_back or reply.refused:  # whose updates made the bad model, per cluster
            failed = {}
            for p in progress.received:
                c = progress.selected.get(p, -1)
                failed[c] = failed.get(c, 0) + 1
        if reply.refused:
            logger.warning("round %d: the aggregator refused the merge: %s", r, reply.refused)
        record = replace(
            record,
            model_version=version,
            rolled_back=rolled_back,
            rollback_reason=judged.reason if rolled_back else "",
            refused_evaluations=judged.refused,
            diverged_evaluations=judged.diverged,
            merge_refused=reply.refused,
            failed_clusters=failed,
            duration_s=time.time() - progress.started,
            finished_at=time.time(),
            **self._privacy_record(reply),
        )
        self._export(record)
        record, convicted, convicted_total, failing = self.state.conclude_round(
            record, MAX_ROLLBACKS
        )
        if convicted:
            logger.warning(
                "round %d: convicted %s (the one untrusted contributor of a rolled-back "
                "round): never selected again",
                r,
                ", ".join(p[:64] for p in convicted),
            )
        self.metrics.convicted.set(convicted_total)
        if failing is not None:
            # Round after round rolled back: the federation makes no progress, and the
            # last good model is what it has.
            raise Diverging(
                f"rounds {failing[0].round}-{r} were all rolled back or their merges refused: "
                f"stopping with the last good model, version {self.state.model_version}"
            )
        logger.info(
            "round %d: accuracy %.3f (std %.3f), %d/%d updates, %d rejected, %.1fs",
            r,
            record.mean_accuracy,
            record.accuracy_std,
            record.received,
            record.selected,
            record.rejected,
            record.duration_s,
        )
        if self.on_round is not None:
            self.on_round(record)

    def _export(self, record: RoundRecord) -> None:
        m = self.metrics
        m.round_seconds.observe(record.duration_s or 0.0)
        for phase, seconds in (record.phases or {}).items():
            m.phase_seconds.labels(phase).observe(seconds)
        m.rounds_completed.inc()
        m.model_version.set(record.model_version or 0)
        m.accuracy_mean.set(record.mean_accuracy or 0.0)
        m.accuracy_std.set(record.accuracy_std or 0.0)
        m.accuracy_worst.set(record.worst_accuracy or 0.0)
        m.loss_mean.set(record.mean_loss or 0.0)
        for c, w in (record.cluster_weights or {}).items():
            m.cluster_weight.labels(cluster_label(c)).set(w)
        # Per cluster, from the same evaluation of the new version: the global model and
        # (--personalise) the cluster's own.
        for c, a in (record.cluster_accuracy or {}).items():
            m.cluster_accuracy.labels(cluster_label(c)).set(a)
        for c, a in (record.personal_cluster_accuracy or {}).items():
            m.personal_cluster_accuracy.labels(cluster_label(c)).set(a)
        if record.personal_mean_accuracy is not None:
            m.personal_accuracy.labels("mean").set(record.personal_mean_accuracy)
            m.personal_accuracy.labels("worst").set(record.personal_worst_accuracy or 0.0)
