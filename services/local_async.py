"""`flclustering local --mode async`: buffered asynchronous aggregation (FedBuff inside
clusters, core/buffered.py) as a discrete-event simulation on the virtual clock.

Nobody waits for a round. After pre-training and clustering (services/inprocess.py, as in
synchronous runs) every grouped participant starts a task from version 0 at clock 0. A task
is trained for real when it starts (from the newest version then), and its update arrives
factor_i x steps later on the virtual clock (core/virtual_clock.py). On arrival:

- a dropped task (`devices.drops`) brings nothing: its participant starts again;
- an update staler than --max-staleness (versions made since its base) is refused: its
  participant starts again from the newest version;
- otherwise it joins its cluster's buffer, and its participant waits until that buffer is
  flushed (one slot per participant: a fast attacker cannot fill a buffer alone).

A full buffer (`buffered.cluster_buffers`) is merged by `buffered_round` into version v+1
(the divergence guard may refuse the merge: v+1 then keeps v's weights), and its
participants start again from v+1. Colluding attackers pool the honest deltas of the
colluders in the same flush, as a synchronous round's colluders pool theirs. Every
--eval-every versions (and at the last) every participant evaluates the newest model, as
after each synchronous round; that is one record (round = the version), and the clusters'
median reported accuracies weigh the following merges. The run stops after --rounds
versions, or when nobody can train any more (--dp local budgets spent).

Events are ordered by (virtual time, participant): the run is a function of the seed.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.figures import group_means, rejections_by_layer
from services.core.buffered import buffer_size_for, buffered_round, cluster_buffers, round_of
from services.core.errors import ConfigError
from services.core.guard import check_merge, remember
from services.core.plan import group_accuracy
from services.core.record import Layout, RoundRecord
from services.core.rounds import defence_for
from services.core.sanity import largest
from services.core.strategies import get_strategy
from services.core.tensors import flatten
from services.experiment import ExperimentConfig
from services.inprocess import (
    Federation,
    RunResult,
    Uplink,
    collude,
    finish,
    measured,
    prepare,
)
from services.participant.attacks import View
from services.participant.backdoor import success_rate
from services.participant.examples import TensorExamples
from services.participant.training import evaluate, local_train


@dataclass(order=True)
class Task:
    """A training task in flight: when its update arrives (units) and whose it is."""

    finish: float
    participant: int
    base: int = field(compare=False)  # the version it trained from
    delta: torch.Tensor | None = field(compare=False, default=None)  # None: dropped
    fired: bool = field(compare=False, default=False)  # an attacker's, in a firing version
    colludes: bool = field(compare=False, default=False)  # crafted from the flush's pool


@dataclass
class Tally:
    """What happened between two records."""

    staleness: list[int] = field(default_factory=list)  # of each update merged
    stale: int = 0
    dropouts: int = 0
    attackers: int = 0  # attackers' updates merged
    fired: bool = False
    upload_bytes: int = 0
    rejected: list[str] = field(default_factory=list)  # the defence's reasons
    rejected_attackers: int = 0
    rejected_clusters: int = 0
    fallbacks: int = 0
    merge_refused: str = ""  # the last refusal's reason
    merge_step: float = 0.0  # the last merge's step
    started: float = field(default_factory=time.perf_counter)


def run_async(
    config: ExperimentConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Run the federation asynchronously and return its figures (one record every
    --eval-every versions)."""
    # A buffer too small for the rule fails before any training; a cluster too small for
    # it once the clusters are known.
    strategy, asked = get_strategy(config.federation.strategy), config.pace.buffer_size
    buffer_size_for(strategy, config.defence.byzantine_fraction, asked)
    fl = prepare(config)
    members = Counter(fl.groups.values())
    sizes = cluster_buffers(strategy, config.defence.byzantine_fraction, asked, members)
    run = AsyncRun(fl, sizes, progress)
    run.run()
    return finish(fl, run.global_w, run.version)


class AsyncRun:
    """The simulation's state: the tasks in flight, the buffers, the newest version."""

    def __init__(
        self,
        fl: Federation,
        sizes: dict[int, int],
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.fl = fl
        self.sizes = sizes  # cluster -> its buffer's size
        self.progress = progress
        self.uplink = Uplink(fl.config, fl.people, fl.spec)
        self.queue: list[Task] = []
        self.buffers: dict[int, list[Task]] = {c: [] for c in sizes}
        self.global_w = fl.w0
        self.version = 0
        self.steps: list[float] = []  # the last accepted merges' lengths (the guard's)
        self.reported: dict[int, float] = {}  # accuracies reported at the last evaluation
        self.tally = Tally()
        self.recorded = 0  # the version of the last record

    def run(self) -> None:
        """Start everyone at clock 0 and process arrivals until --rounds versions."""
        fl, rounds = self.fl, self.fl.config.federation.rounds
        for i in sorted(fl.groups):
            self.start(i, 0.0)
        fl.clock.calibrate()  # the first wave's measured seconds per step
        now = 0.0
        while self.version < rounds and self.queue:
            task = heapq.heappop(self.queue)
            now = task.finish
            self.arrive(task)
        if self.version < rounds:  # nobody can train any more (--dp local)
            why = "the participants whose privacy budget is not spent cannot fill a buffer"
            if self.version == 0:
                spent = [dp.refuses(fl.config.training) for dp in fl.sgd.values()]
                raise ConfigError(f"no version can be made: {next(filter(None, spent), why)}")
            fl.result.privacy["stopped"] = f"stopped at version {self.version}: {why}"
            if self.recorded < self.version:
                self.record(now)

    def start(self, i: int, now: float) -> None:
        """Participant i starts a task from the newest version at `now` (trained here)."""
        fl, train = self.fl, self.fl.config.training
        if fl.sgd and fl.sgd[i].refuses(train):  # its budget is spent: it stops
            return
        p, attack = fl.people[i], fl.attack
        if fl.clock.drops(i):  # the device will go away: nothing to train
            units = fl.clock.units(i, fl.steps(p.samples))
            heapq.heappush(self.queue, Task(now + units, i, self.version))
            return
        fl.load(self.global_w)
        x, y = p.x_train, p.y_train
        view = View(self.version, self.sizes[fl.groups[i]], p.gen)
        if p.attacker:
            x, y = attack.on_data(x, y, view)
        examples = TensorExamples(x, y)
        rnd = round_of(self.version, len(self.sizes))
        done = local_train(fl.model, examples, train, rnd, p.gen, privacy=fl.sgd.get(i))
        fl.clock.measure(done.seconds, fl.steps(len(y)))
        w = flatten(fl.model.state_dict(), fl.spec)
        crafts = p.attacker and attack.crafts_update(self.version)
        if crafts and not attack.pools_update:
            w = attack.on_update(w, self.global_w, view)
        units = fl.clock.units(i, fl.steps(len(y)))
        task = Task(
            now + units,
            i,
            self.version,
            w - self.global_w,
            p.attacker and attack.fires(self.version),
            crafts and attack.pools_update,
        )
        heapq.heappush(self.queue, task)

    def arrive(self, task: Task) -> None:
        """A task comes back: dropped, refused as stale, or into its cluster's buffer."""
        i, now = task.participant, task.finish
        if task.delta is None:
            self.tally.dropouts += 1
            self.start(i, now)
        elif self.version - task.base > self.fl.config.pace.max_staleness:
            self.tally.stale += 1
            self.start(i, now)
        else:
            c = self.fl.groups[i]
            self.buffers[c].append(task)
            if len(self.buffers[c]) >= self.sizes[c]:
                self.flush(c, now)

    def flush(self, c: int, now: float) -> None:
        """Merge cluster c's full buffer into the next version; its participants restart."""
        fl, config = self.fl, self.fl.config
        batch = sorted(self.buffers[c], key=lambda t: t.participant)
        self.buffers[c] = []
        if any(t.colludes for t in batch):  # they pool their honest deltas (omniscient:
            # the whole buffer's) and each sends the crafted one
            known = [t.delta for t in batch if t.delta is not None]
            assert len(known) == len(batch)  # dropped tasks never reach a buffer
            crafted = collude(
                fl.attack,
                known,
                [t.colludes for t in batch],
                [c] * len(batch),
                [View(self.version, len(batch), fl.people[t.participant].gen) for t in batch],
                defence_for(fl.strategy, config.defence),
            )
            for t, delta in zip(batch, crafted, strict=True):
                t.delta = delta
        deltas = []
        for t in batch:
            assert t.delta is not None  # dropped tasks never reach a buffer
            sent, cost = self.uplink.send(t.participant, t.delta)
            deltas.append(sent)
            self.tally.upload_bytes += cost
        staleness = [self.version - t.base for t in batch]
        outcome = buffered_round(
            self.global_w,
            torch.stack(deltas),
            [c] * len(batch),
            [fl.people[t.participant].samples for t in batch],
            staleness,
            fl.strategy,
            self.version,
            group_accuracy(self.reported, fl.groups, fl.groups),
            config.defence,
            sorted(self.sizes),
        )
        guard = check_merge(
            self.global_w.cpu(),
            outcome.global_weights.cpu(),
            self.steps,
            bounds=config.federation.guard,
        )
        if guard.refused:
            self.tally.merge_refused = guard.refused
        else:
            if not torch.equal(outcome.global_weights, self.global_w):
                self.steps = remember(self.steps, guard.step)
            self.global_w = outcome.global_weights
        defence, tally = outcome.defence, self.tally
        tally.merge_step = guard.step
        tally.staleness += staleness
        tally.attackers += sum(fl.people[t.participant].attacker for t in batch)
        tally.fired = tally.fired or any(t.fired for t in batch)
        tally.rejected += list(defence.rejected_updates.values())
        tally.rejected_attackers += sum(
            fl.people[batch[k].participant].attacker for k in defence.rejected_updates
        )
        tally.rejected_clusters += len(defence.rejected_clusters)
        tally.fallbacks += len(defence.fallbacks)
        self.version += 1
        fl.clock.calibrate()
        for t in batch:
            self.start(t.participant, now)
        if self.version % config.pace.eval_every == 0 or self.version == config.federation.rounds:
            self.record(now)

    def record(self, now: float) -> None:
        """Everyone evaluates the newest version: one record, and the accuracies the
        clusters' merge weights read until the next evaluation (attackers may lie)."""
        fl, tally = self.fl, self.tally
        fl.load(self.global_w)
        figs = [evaluate(fl.model, p.test) for p in fl.people]
        published = {p.index: a for p, (_, a) in zip(fl.people, figs, strict=True)}
        self.reported = dict(published)
        for i in published:
            p = fl.people[i]
            if p.attacker and i in fl.groups:
                view = View(self.version, self.sizes[fl.groups[i]], p.gen)
                self.reported[i] = fl.attack.on_report({"accuracy": published[i]}, view)["accuracy"]
        backdoor = None
        if fl.settings.backdoors:  # every test input of the other classes, triggered
            data = fl.data
            backdoor = success_rate(fl.model, data.x_test, data.y_test, fl.settings.target)
        private: dict[str, Any] = {}
        if fl.sgd:  # the most any participant has spent
            private["epsilon"] = max(dp.epsilon for dp in fl.sgd.values())
        staleness = tally.staleness
        record = RoundRecord(
            round=self.version,
            layout=Layout.LOCAL,
            **measured(fl.people, figs),
            cluster_accuracy=group_means(published, fl.groups),
            duration_s=time.perf_counter() - tally.started,
            clock_s=fl.clock.seconds(now),
            model_version=self.version,
            updates=len(staleness),
            dropouts=tally.dropouts,
            staleness_mean=sum(staleness) / len(staleness) if staleness else 0.0,
            staleness_max=max(staleness, default=0),
            stale=tally.stale,
            rejected=len(tally.rejected),
            rejected_attackers=tally.rejected_attackers,
            attackers_selected=tally.attackers,
            rejected_clusters=tally.rejected_clusters,
            fallbacks=tally.fallbacks,
            rejected_by=rejections_by_layer(tally.rejected),
            attack_fired=tally.fired,
            upload_bytes=tally.upload_bytes,
            merge_refused=tally.merge_refused,
            merge_step=tally.merge_step,
            largest_weight=largest({"w": self.global_w}),
            backdoor_success_rate=backdoor,
            **private,
        ).to_dict()
        fl.result.add(record, self.progress)
        self.tally = Tally()
        self.recorded = self.version
