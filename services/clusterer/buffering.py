"""--mode async: the clusterer's side of buffered aggregation (core/buffered.py).

After pre-training and clustering, exactly as in rounds, nobody waits for a round:

- every active member without a task gets a TRAIN task of the newest version, and trains
  again as soon as its update has left its cluster's buffer (one update per participant
  and buffer: a fast or hostile participant cannot fill a buffer alone);
- uploads are taken at any time (a task's version, whatever has happened since) and
  relayed to the aggregator, which keeps them in per-cluster buffers, each a delta against
  the version it was trained from, and refuses them past --max-staleness;
- when a cluster's buffer holds its target (--buffer-size, or all of the cluster's active
  members when it has fewer), the aggregator is asked to flush it (Aggregate with `flush`):
  the cluster's rule on the staleness-weighted deltas, times the cluster's fair weight
  among all clusters, makes the next version;
- every --eval-every versions the evaluation sample (fixed for the run) evaluates the
  newest version, each member as soon as it is between tasks; the medians of the members'
  latest evaluations per cluster are the fair merge's accuracies, and the sample's mean is
  the history's accuracy (with the version it is of: `evaluated_version`).

Durability: the aggregator's buffers are the truth about acknowledged updates (read at
start and after a restart); each version's record is journaled; a record lost with a
killed clusterer is asked for again (Aggregate is idempotent) so no version is skipped.

The divergence guard refuses an outsized or non-finite merge at the aggregator, as in
rounds (the version is kept; the buffer's updates are dropped). The evaluators' rollback
is a round's: with no round to judge, async mode does not roll back (docs/operations.md).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from services.clusterer.collection import AsyncCollection, Evaluation, accuracy_fields
from services.common.figures import accuracy_summary, rejections_by_layer
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.core.buffered import buffer_size_for, round_of
from services.core.errors import ConfigError, StateError
from services.core.plan import evaluation_sample, group_accuracy
from services.core.record import RoundRecord

if TYPE_CHECKING:
    from services.clusterer.coordinator import Coordinator

logger = logging.getLogger(__name__)
TICK_S = 1.0  # longest wait between looks at buffers, tasks and evaluations


class BufferedRounds:
    """Drives --mode async for a coordinator (its aggregator calls, state and metrics)."""

    def __init__(self, co: Coordinator) -> None:
        self.co = co
        self.pace = co.config.pace
        self.latest: dict[str, Evaluation] = {}  # each member's newest evaluation
        self.evaluated: tuple[int, dict[str, Evaluation]] = (-1, {})  # the sample's newest
        self.asking: tuple[str, int, float] | None = None  # evaluation under way
        self.made_at = time.time()  # when the newest version was made
        self.targets: dict[int, int] = {}  # each cluster's buffer target (`_targets`)

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Make versions until --rounds of them exist (or the service stops)."""
        co = self.co
        status = co._aggregator_status()
        self._check_policy(status)
        step = self._resume(status)
        target = buffer_size_for(
            co.strategy, status.policy.byzantine_fraction, self.pace.buffer_size
        )
        clusters = co.state.clusters_of(co.state.member_ids())
        buffered = {p: clusters.get(p, -1) for p in status.pending_participants}
        co.state.open_buffers(step, buffered)
        groups = {p: c for p, c in clusters.items() if c >= 0}
        sample = evaluation_sample(groups, co.fed.eval_sample, co.fed.seed, 0)
        logger.info(
            "asynchronous: buffers of %d per cluster, versions %d to %d, %d evaluating",
            target,
            step,
            co.fed.rounds,
            len(sample),
        )
        while step < co.fed.rounds:
            if co.stop.is_set():
                return
            final = step == co.fed.rounds - 1
            full = self._tick(step, target, sample)
            if not full:
                co._wait(self._ready, TICK_S)
                continue
            reply = self._flush(step, full)
            self._record(step, reply, sample, final)
            step += 1
        co.state.finish(co.fed.rounds)
        logger.info("federation done after %d versions", co.fed.rounds)

    def _check_policy(self, status: agg_pb.GetAggregatorStatusResponse) -> None:
        if status.policy.max_staleness != self.pace.max_staleness:
            raise ConfigError(
                f"the aggregator runs --max-staleness {status.policy.max_staleness}, this "
                f"clusterer {self.pace.max_staleness}: start both alike"
            )

    def _resume(self, status: agg_pb.GetAggregatorStatusResponse) -> int:
        """The next version step, checked against this clusterer's history; a version the
        aggregator made whose record was lost (a kill between the answer and the journal)
        is asked for again and recorded, so no version is skipped."""
        co = self.co
        at = int(status.open_round)
        history = co.state.history
        mine = history[-1].round + 1 if history else None
        if mine is not None and at == mine + 1:
            logger.info("recording version step %d again (its record was lost)", mine)
            reply = self._ask_flush(mine, frozenset())
            co.state.flushed(list(reply.merged))
            self._record(mine, reply, [], False)
            mine += 1
        if mine is not None and at != mine:
            raise StateError(
                f"the aggregator is at version step {at}, this clusterer's history at {mine}: "
                "they are not the same federation"
            )
        co._refresh_model(int(status.model_version))
        return at

    def _tick(self, step: int, target: int, sample: list[str]) -> list[int]:
        """Evaluations and tasks handed out; the clusters whose buffers are full."""
        co = self.co
        owing = self._evaluations(sample)
        oldest = co.state.model_version - self.pace.max_staleness
        # A task's round sets its learning rate: the round its version counts as.
        rnd = round_of(co.state.model_version, len(co.state.cluster_ids()))
        _, replaced = co.state.hand_out(step, co.timing.liveness_s, oldest, set(owing), rnd)
        co.metrics.dropouts.inc(replaced)
        self.targets = self._targets(target)
        return self._full(co.state.buffered())

    def _targets(self, target: int) -> dict[int, int]:
        """Each cluster's buffer target: --buffer-size, or its active members when fewer
        (its rule then takes its documented fallback, reported)."""
        sizes: dict[int, int] = {}
        for c in self.co.state.active_groups(self.co.timing.liveness_s).values():
            sizes[c] = sizes.get(c, 0) + 1
        return {c: min(target, n) for c, n in sizes.items()}

    def _full(self, counts: dict[int, int]) -> list[int]:
        """The clusters whose buffers reached their targets."""
        return sorted(c for c, n in counts.items() if c in self.targets and n >= self.targets[c])

    def _ready(self) -> bool:
        """Whether a buffer reached its target (checked under the state's lock)."""
        c = self.co.state.collecting
        return isinstance(c, AsyncCollection) and bool(self._full(c.buffered()))

    # ---- the aggregator ------------------------------------------------------------------
    def _accuracy(self) -> dict[int, float]:
        """The median of the members' newest evaluations, per cluster."""
        co = self.co
        ok = {p: e.accuracy for p, e in self.latest.items() if e.verdict == "ok"}
        clusters = co.state.clusters_of(ok)
        return group_accuracy(ok, clusters, clusters)

    def _ask_flush(self, step: int, full: frozenset[int]) -> agg_pb.AggregateResponse:
        co = self.co
        request = agg_pb.AggregateRequest(
            round=step,
            cluster_accuracy=self._accuracy(),
            flush=sorted(full) or [0],  # asked again: the aggregator answers the same
            clusters=co.state.cluster_ids(),
        )
        reply: agg_pb.AggregateResponse = co._ask_aggregator("Aggregate", request, timeout=600)
        return reply

    def _flush(self, step: int, full: list[int]) -> agg_pb.AggregateResponse:
        co = self.co
        reply = self._ask_flush(step, frozenset(full))
        co.state.flushed(list(reply.merged))
        if int(reply.model_version) != co.state.model_version:
            co._refresh_model(int(reply.model_version))
        if reply.refused:
            logger.warning("version step %d: merge refused: %s", step, reply.refused)
        return reply

    # ---- evaluations -----------------------------------------------------------------
    def _evaluations(self, sample: list[str]) -> list[str]:
        """Start, feed and close the sample's evaluation of the newest version every
        --eval-every versions; who owes one now (no TRAIN task is given to them)."""
        co = self.co
        version = co.state.model_version
        if self.asking is None:
            due = version - max(self.evaluated[0], 0) >= self.pace.eval_every
            if not sample or not (due or self.evaluated[0] < 0):
                return []
            self.asking = (f"async-v{version}", version, time.monotonic())
            co.models.pin(version)
        tag, asked_version, began = self.asking
        owing = co.state.ask_when_free(tag, asked_version, sample)
        late = time.monotonic() - began > co.timing.eval_timeout_s
        if owing and not late:
            return owing
        results, missed = co.state.close_evaluation(tag, sample)
        co.models.pin(asked_version, False)
        logger.info(
            "evaluation of version %d: %d of %d in after %.1fs",
            asked_version,
            len(results),
            len(sample),
            time.monotonic() - began,
        )
        co.metrics.timed_out.labels("evaluate").inc(len(missed))
        self.latest.update(results)
        self.evaluated = (asked_version, results)
        self.asking = None
        accs = [e.accuracy for e in results.values() if e.verdict == "ok"]
        if accs:
            s = accuracy_summary(accs)
            co.metrics.accuracy_mean.set(s.mean)
            co.metrics.accuracy_worst.set(s.worst)
            co.metrics.accuracy_std.set(s.std)
        return []

    def _final_evaluation(self, sample: list[str]) -> None:
        """The last version is evaluated before its record is written (the run's result)."""
        co = self.co
        version = co.state.model_version
        if self.evaluated[0] == version or not sample:
            return
        if self.asking is not None:
            co.state.close_evaluation(self.asking[0], sample)
            co.models.pin(self.asking[1], False)
            self.asking = None
        tag = f"async-final-v{version}"
        deadline = time.monotonic() + co.timing.eval_timeout_s
        while time.monotonic() < deadline and not co.stop.is_set():
            owing = co.state.ask_when_free(tag, version, sample)
            if not owing:
                break
            co._wait(lambda: co.state.evaluated(tag, sample), TICK_S)
        results, _ = co.state.close_evaluation(tag, sample)
        self.latest.update(results)
        self.evaluated = (version, results)

    # ---- the record ----------------------------------------------------------------------
    def _record(
        self, step: int, reply: agg_pb.AggregateResponse, sample: list[str], final: bool
    ) -> None:
        co = self.co
        if final:
            self._final_evaluation(sample)
        now = time.time()
        evaluated_version, evals = self.evaluated
        counted = {p: e for p, e in evals.items() if e.verdict == "ok"}
        record = RoundRecord(
            round=step,
            model_version=int(reply.model_version),
            selected=len(reply.merged),
            received=len(reply.merged),
            updates=int(reply.updates),
            abandoned=bool(reply.abandoned),
            rejected=len(reply.rejected),
            rejected_by=rejections_by_layer(r.reason for r in reply.rejected),
            rejected_clusters=len(reply.rejected_clusters),
            fallbacks=len(reply.fallbacks),
            cluster_weights={int(c): float(w) for c, w in reply.cluster_weights.items()},
            # Whose buffered updates the version took, with their clusters.
            selection=co.state.clusters_of(reply.merged),
            **accuracy_fields(counted, co.state.true_groups(), co.state.clusters_of(counted)),
            merge_refused=reply.refused,
            duration_s=now - self.made_at,
            finished_at=now,
            evaluated_version=evaluated_version,
            staleness_mean=float(reply.staleness_mean),
            staleness_max=int(reply.staleness_max),
            stale=int(reply.stale),
        )
        self.made_at = now
        co._export(record)
        record, _ = co.state.record_round(record)
        logger.info(
            "version %d (step %d): %d updates, staleness %.2f (max %d), accuracy %.3f of v%d",
            record.model_version or 0,
            step,
            record.updates or 0,
            record.staleness_mean or 0.0,
            record.staleness_max or 0,
            record.mean_accuracy or 0.0,
            evaluated_version,
        )
        if co.on_round is not None:
            co.on_round(record)
