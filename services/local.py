"""A whole federation in one process: the learning core end to end, without the network.

This is the reference loop the gRPC services distribute (docs/algorithm.md, sections 1-7), and
what `flclustering local` runs. It shares every decision with the services: the partition
and the attackers (participant), the clustering and the round plan (clusterer), the
defence and merge (aggregator); participants pre-train and train with the same seeded
generators as the participant service, so with the same seed both runs select the same
participants into the same clusters (services/inprocess.py sets the federation up).

Rounds are synchronous here: each waits for the updates it uses, on the virtual clock of
simulated devices (core/virtual_clock.py: --speed-spread, --dropout, --over-select).
`--mode async` runs buffered asynchronous versions instead (services/local_async.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.common.figures import accuracy_summary, group_means, rejections_by_layer
from services.common.homomorphic import upload_tensors
from services.common.schema import SchemaSettings
from services.common.settings import FederationSettings
from services.core.accountant import Ledger, Step
from services.core.ckks import HeKeys
from services.core.defence import RoundDefence
from services.core.errors import ConfigError
from services.core.guard import check_merge, remember
from services.core.merge import local_steps
from services.core.model_file import ModelCard
from services.core.plan import group_accuracy, plan_round
from services.core.privacy import CentralNoise, expected_counts
from services.core.quantise import (
    payload_bytes,
)
from services.core.quarantine import Quarantine, judge
from services.core.record import Layout, RoundRecord
from services.core.rounds import RoundOutcome, aggregate_round, defence_for
from services.core.sanity import largest, unfit
from services.core.selection import poisson_rates
from services.core.tensors import flatten
from services.core.virtual_clock import first_arrivals, over_selected
from services.experiment import ExperimentConfig
from services.inprocess import (
    Participant,
    RunResult,
    Uplink,
    collude,
    finish,
    measured,
    model_card,
    prepare,
)
from services.local_async import run_async
from services.participant.attacks import View
from services.participant.backdoor import success_rate
from services.participant.examples import TensorExamples
from services.participant.partition import federation_data
from services.participant.settings import DataSettings
from services.participant.training import evaluate, local_train


@dataclass(frozen=True)
class LocalVerdict:
    """A participant's verdict on a new version in process (what ReportEvaluation says)."""

    accuracy: float
    verdict: str
    reason: str = ""


def verdicts(
    people: list[Participant],
    figs: list[tuple[float, float]],
    new: torch.Tensor,
    before: torch.Tensor,
) -> dict[str, LocalVerdict]:
    """Every participant's verdict on the new global model (services/participant/worker.py:
    refused when it is not fit to adopt, diverged when its loss is not finite)."""
    why = None
    if new is not before:
        last_top = largest({"w": before})
        why = unfit({"w": new}, last_top)
    out = {}
    for p, (loss, acc) in zip(people, figs, strict=True):
        if why is not None:
            out[str(p.index)] = LocalVerdict(0.0, "refused", why)
        elif not math.isfinite(loss):
            out[str(p.index)] = LocalVerdict(0.0, "diverged", "its loss is not finite")
        else:
            out[str(p.index)] = LocalVerdict(acc, "ok")
    return out


def run_local(
    config: ExperimentConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Run a federation in-process and return its figures: rounds that wait for their
    selected participants, or (--mode async) buffered asynchronous versions."""
    if config.pace.asynchronous:
        return run_async(config, progress)
    fl = prepare(config)
    fed, train = config.federation, config.training
    strategy, settings, attack = fl.strategy, fl.settings, fl.attack
    data, people, model, spec = fl.data, fl.people, fl.model, fl.spec
    sgd, groups, clock, result, load = fl.sgd, fl.groups, fl.clock, fl.result, fl.load
    global_w = fl.w0
    rng = np.random.default_rng(fed.seed)  # the round plan's stream, as in the clusterer
    # Personalised: each cluster's own model (a cluster no update reached serves the global).
    cluster_w: dict[int, torch.Tensor] = {}

    def base_of(i: int) -> torch.Tensor:
        return cluster_w.get(groups.get(i, -1), global_w) if fed.personalise else global_w

    uplink = Uplink(config, people, spec)
    sealed = None
    if fed.secure == "he":  # one key pair; the "aggregator" holds the public context only
        secret = HeKeys.create()
        sealed = (secret, HeKeys.from_bytes(secret.public_bytes(), "public context"))
    central = CentralPlan.of(config, groups) if config.privacy.central else None
    published: dict[int, float] = {}  # everyone's accuracy of the current global model
    figs: list[tuple[float, float]] = []  # everyone's (loss, accuracy) of it
    quarantine = Quarantine()  # who may train after failed rounds (as the clusterer's)
    steps: list[float] = []  # the last accepted merges' lengths (the aggregator's guard)
    # --over-select: select more, close the round at the first --select updates (under
    # central DP the Poisson draw is the round: the noise is calibrated to its counts).
    asked = over_selected(fed.select, config.pace.over_select)
    elapsed = 0.0  # the virtual clock since round 0, in units (core/virtual_clock.py)
    for rnd in range(fed.rounds):
        start = time.perf_counter()
        if central is not None:  # the budget: stop before a round that would exceed it
            stop = central.ledger.refuses(central.step)
            if stop:
                if not result.rounds:
                    raise ConfigError(f"no round can run: {stop}")
                result.privacy["stopped"] = f"stopped before round {rnd}: {stop}"
                break
        allowed = set(quarantine.eligible(str(i) for i in groups))
        # --dp local: a participant whose next round would exceed its budget has stopped.
        spent = {i for i, dp in sgd.items() if dp.refuses(train)}
        if sgd and spent >= set(groups):
            if not result.rounds:
                raise ConfigError(f"no round can run: {sgd[min(spent)].refuses(train)}")
            result.privacy["stopped"] = (
                f"stopped before round {rnd}: every participant's privacy budget is spent"
            )
            break
        selectable = {i: c for i, c in groups.items() if str(i) in allowed and i not in spent}
        plan = plan_round(
            strategy,
            selectable,
            rnd,
            asked,
            fed.eval_per_cluster,
            rng,
            None if central is None else central.rates,
        )
        # Accuracy of the current global model per group, for the fair merge: every
        # member of a selected group evaluated it after the last round (as the services'
        # members evaluate each published version), the planned evaluators otherwise.
        load(global_w)
        accs = {}
        if plan.evaluators:
            wanted = set(plan.selected.values())
            accs = {i: a for i, a in published.items() if groups.get(i, -1) in wanted}
            for i in plan.evaluators:
                if i not in accs:
                    accs[i] = evaluate(model, people[i].test)[1]
        for i in accs:  # what lying attackers report instead
            if people[i].attacker:
                view = View(rnd, len(plan.selected), people[i].gen)
                accs[i] = attack.on_report({"accuracy": accs[i]}, view)["accuracy"]
        group_acc = group_accuracy(accs, groups, plan.selected)
        rows: list[int] = []
        updates: list[torch.Tensor] = []
        losses: list[float] = []
        arrives: dict[int, float] = {}  # when each update arrives, in units
        dropped = [i for i in plan.selected if clock.drops(i)]  # devices that went away
        for i in plan.selected:
            if i in dropped:  # it would train and send nothing: not trained here
                continue
            p = people[i]
            base = base_of(i)
            load(base)
            if strategy.needs_losses:
                losses.append(evaluate(model, p.train)[0])
            x, y = p.x_train, p.y_train
            view = View(rnd, len(plan.selected), p.gen)
            if p.attacker:
                x, y = attack.on_data(x, y, view)
            done = local_train(model, TensorExamples(x, y), train, rnd, p.gen, privacy=sgd.get(i))
            clock.measure(done.seconds, fl.steps(len(y)))  # the task's compute time
            arrives[i] = clock.units(i, fl.steps(len(y)))
            w = flatten(model.state_dict(), spec)
            if p.attacker and attack.crafts_update(rnd) and not attack.pools_update:
                w = attack.on_update(w, base, view)
            rows.append(i)
            updates.append(w - base)
        if attack.pools_update and attack.crafts_update(rnd):
            # The round's attackers pool their honest deltas (omniscient: everyone's) and
            # each sends the crafted delta.
            updates = collude(
                attack,
                updates,
                [people[i].attacker for i in rows],
                [plan.selected[i] for i in rows],
                [View(rnd, len(rows), people[i].gen) for i in rows],
                defence_for(strategy, config.defence),
            )
        # The round closes at its first --select updates in virtual time; the later ones
        # straggle (sent, refused, never merged). Its duration: the last update it uses.
        used = set(first_arrivals(arrives, fed.select if central is None else len(arrives)))
        kept = [k for k, i in enumerate(rows) if i in used]
        rows, updates = [rows[k] for k in kept], [updates[k] for k in kept]
        losses = [losses[k] for k in kept] if losses else losses
        clock.calibrate()
        elapsed += max((arrives[i] for i in rows), default=0.0)
        # What travels: float32 weights, or each delta compressed as its participant would.
        upload_bytes = 0
        for k, i in enumerate(rows):
            updates[k], sent = uplink.send(i, updates[k])
            upload_bytes += sent
        if not rows:  # Poisson sampling (or the quarantine) left the round empty
            outcome_round = RoundOutcome(global_w, RoundDefence({}), {})
        elif sealed is not None:
            # --secure he: each participant encrypts n_i * w_i with its key, the aggregator's
            # public context adds them, participants decrypt the sum and divide by N.
            secret, public = sealed
            samples = [people[i].samples for i in rows]
            uploads = [
                secret.encrypt(global_w + updates[k].to(global_w.device), n)
                for k, n in enumerate(samples)
            ]
            upload_bytes = sum(payload_bytes(upload_tensors(secret, u)) for u in uploads)
            total = public.add(uploads, global_w.numel())
            new = secret.decrypt(total, global_w.numel()) / sum(samples)
            outcome_round = RoundOutcome(
                new.to(global_w.device, torch.float32), RoundDefence({}), {0: 1.0}
            )
        else:
            outcome_round = aggregate_round(
                global_w,
                torch.stack(updates),
                [plan.selected[i] for i in rows],
                [people[i].samples for i in rows],
                strategy,
                rnd,
                group_acc,
                config.defence,
                losses or None,
                train.lr_at(rnd),
                local_steps(
                    [people[i].samples for i in rows], train.local_epochs, train.batch_size
                ),
                cluster_w if fed.personalise else None,
                None if central is None else central.mechanism(),
            )
        private: dict[str, Any] = {}
        if central is not None:  # spent whatever the guard decides: the merge was computed
            private = central.spend(outcome_round)
        elif sgd:  # the most any participant has spent
            private = {"epsilon": max(dp.epsilon for dp in sgd.values())}
        # The aggregator's divergence guard (it cannot look under --secure he), then the
        # participants' verdicts on the new version, as the services run them.
        before_w, before_figs = global_w, figs
        refused, step = "", 0.0
        if sealed is None:
            guard = check_merge(
                global_w.cpu(), outcome_round.global_weights.cpu(), steps, bounds=fed.guard
            )
            refused, step = guard.refused, guard.step
            if not refused and not torch.equal(outcome_round.global_weights, global_w):
                steps = remember(steps, guard.step)
        if not refused:
            global_w = outcome_round.global_weights
            cluster_w.update(outcome_round.cluster_models)
        outcome = outcome_round.defence
        rejected_attackers = sum(people[rows[i]].attacker for i in outcome.rejected_updates)
        # Every participant evaluates the new global model on its own test split.
        load(global_w)
        figs = [evaluate(model, p.test) for p in people]
        pairs = [
            (published[p.index], a)
            for p, (_, a) in zip(people, figs, strict=True)
            if p.index in published
        ]
        drops = [old - new for old, new in pairs]
        ratios = [new / old for old, new in pairs if old > 0]
        previous = {str(i): a for i, a in published.items()} if fed.guard else {}
        judged = judge(verdicts(people, figs, global_w, before_w), previous)
        rolled_back = judged.collapsed and global_w is not before_w
        if rolled_back:  # the last good version again (cluster models start from it)
            global_w = before_w
            cluster_w.clear()
            load(global_w)
            figs = before_figs or [evaluate(model, p.test) for p in people]
        shaped = [str(i) for k, i in enumerate(rows) if k not in outcome.rejected_updates]
        quarantine.record(shaped, rolled_back or bool(refused))
        published = {p.index: a for p, (_, a) in zip(people, figs, strict=True)}
        personal: dict[str, Any] = {}
        if fed.personalise:  # ... and the model of its cluster, the one it serves
            mine: dict[int, float] = {}
            for c in sorted({groups.get(p.index, -1) for p in people}):
                load(cluster_w.get(c, global_w))
                for p in people:
                    if groups.get(p.index, -1) == c:
                        mine[p.index] = evaluate(model, p.test)[1]
            ps = accuracy_summary(list(mine.values()))
            personal = {
                "personal_mean_accuracy": ps.mean,
                "personal_accuracy_std": ps.std,
                "personal_worst_accuracy": ps.worst,
                "personal_group_accuracy": group_means(mine, {p.index: p.group for p in people}),
            }
            load(global_w)
        backdoor = None
        if settings.backdoors:  # every test input of the other classes, triggered
            backdoor = success_rate(model, data.x_test, data.y_test, settings.target)
        fired = attack.fires(rnd) and any(people[i].attacker for i in rows)
        record = RoundRecord(
            round=rnd,
            layout=Layout.LOCAL,
            **measured(people, figs),
            cluster_accuracy=group_means(published, groups),
            duration_s=time.perf_counter() - start,
            clock_s=clock.seconds(elapsed),
            updates=len(rows),
            stragglers=len(arrives) - len(rows),
            dropouts=len(dropped),
            rejected=len(outcome.rejected_updates),
            rejected_attackers=rejected_attackers,
            attackers_selected=sum(people[i].attacker for i in rows),
            rejected_clusters=len(outcome.rejected_clusters),
            fallbacks=len(outcome.fallbacks),
            rejected_by=rejections_by_layer(outcome.rejected_updates.values()),
            attack_fired=fired,
            upload_bytes=upload_bytes,
            selection={str(i): c for i, c in plan.selected.items()},
            merge_refused=refused,
            merge_step=step,  # ||w_new - w|| of the merge (accepted or not)
            largest_weight=largest({"w": global_w}),
            fell=judged.fell,  # evaluators whose accuracy fell by more than FALL
            # the median evaluator's fall in accuracy from the version before (the guard's
            # collapse rule compares it with FALL)
            median_drop=float(np.median(drops)) if drops else 0.0,
            # the median evaluator's accuracy of the new version over its accuracy before
            median_ratio=float(np.median(ratios)) if ratios else 1.0,
            rolled_back=rolled_back,
            rollback_reason=judged.reason if rolled_back else "",
            refused_evaluations=judged.refused,
            diverged_evaluations=judged.diverged,
            backdoor_success_rate=backdoor,
            **personal,
            **private,
        ).to_dict()
        result.add(record, progress)
    if central is not None:
        result.privacy.update(central.summary())
        result.final["epsilon"] = result.privacy["epsilon"]
    return finish(fl, global_w, len(result.rounds))


@dataclass
class CentralPlan:
    """Central differential privacy in process, as the clusterer and aggregator run it:
    Poisson rates per cluster, the bound (adaptive or fixed), the noise's generator and
    the ledger."""

    rates: dict[int, float]
    expected: dict[int, float]
    clip: float
    ledger: Ledger
    generator: torch.Generator
    config: ExperimentConfig

    @staticmethod
    def of(config: ExperimentConfig, groups: dict[int, int]) -> CentralPlan:
        """The plan for the federation's groups (sizes are public: zero-out adjacency)."""
        p = config.privacy
        sizes: dict[int, int] = {}
        for c in groups.values():
            sizes[c] = sizes.get(c, 0) + 1
        rates = poisson_rates(sizes, config.federation.select)
        # A simulation's noise is seeded so that runs repeat; the aggregator draws its
        # seed from the operating system (docs/privacy.md).
        gen = torch.Generator().manual_seed(config.federation.seed * 7919 + 0xD9)
        return CentralPlan(
            rates,
            expected_counts(sizes, rates),
            p.dp_clip,
            Ledger(p.dp_delta, p.dp_epsilon),
            gen,
            config,
        )

    @property
    def step(self) -> list[Step]:
        """One round of the mechanism, for every participant at most the largest rate."""
        return [Step(self.config.privacy.dp_noise, max(self.rates.values()))]

    def mechanism(self) -> CentralNoise:
        """This round's mechanism."""
        return self.config.privacy.mechanism(self.clip, self.expected, self.generator)

    def spend(self, outcome: RoundOutcome) -> dict[str, Any]:
        """Record the round in the ledger; the round record's privacy fields. A round that
        drew nobody released nothing (whether anyone was drawn is the sampling's, not the
        data's) and spends nothing, as the aggregator abandons it in the services."""
        noise = outcome.noise
        if noise is None:
            return {"epsilon": self.ledger.epsilon}
        step = self.step[0]
        self.ledger.spend([step])
        self.clip = noise.next_clip
        return {
            "epsilon": self.ledger.epsilon,
            "dp_noise": step.noise,
            "dp_rate": step.rate,
            "dp_clip": noise.clip,
            "dp_sigma": noise.sigma,
            "dp_clipped": noise.clipped,
        }

    def summary(self) -> dict[str, Any]:
        """results.json's privacy block."""
        p = self.config.privacy
        return {
            "mode": "central",
            "epsilon": self.ledger.epsilon,
            "delta": p.dp_delta,
            "budget": p.dp_epsilon,
            "noise_multiplier": p.dp_noise,
            "rates": {str(c): r for c, r in sorted(self.rates.items())},
            "expected": {str(c): n for c, n in sorted(self.expected.items())},
            "rounds": len(self.ledger.steps),
            "accountant": "Renyi DP of the Poisson-sampled Gaussian (Opacus)",
            "adjacency": "zero-out: one participant's updates",
        }


@dataclass(frozen=True)
class Described:
    """What a federation's model is built for, and how its card is written: from the
    declared sample (own data) or from the named dataset (loaded for its classes and
    standardisation). `init-model` and `export` both need it."""

    input_shape: tuple[int, int, int]
    outputs: int
    card: Callable[[dict[str, Any]], ModelCard]  # facts -> the card


def described(fed: FederationSettings, data: DataSettings, sample: SchemaSettings) -> Described:
    """The model's input, outputs and card maker for these settings."""
    if sample.declared:
        return Described(
            sample.input_shape,
            sample.outputs,
            lambda facts: sample_card(fed.model, sample, facts),
        )
    loaded = federation_data(fed, data, hosted=())
    return Described(
        loaded.input_shape,
        loaded.num_classes,
        lambda facts: model_card(fed.model, fed.dataset, loaded, facts),
    )


def sample_card(model: str, sample: SchemaSettings, facts: dict[str, Any]) -> ModelCard:
    """The card of a `model` trained on owners' data (--dataset own): what a sample is comes
    from the federation's declaration, never from one owner's data; the normalisation is
    the declared one, or none recorded (each owner standardised with its own statistics)."""
    declared = sample.normalise == "declared"
    return ModelCard(
        model,
        "own",
        sample.input_shape,
        sample.class_names,
        sample.mean if declared else (),
        sample.std if declared else (),
        facts,
        sample.model_dump(mode="json"),
    )
