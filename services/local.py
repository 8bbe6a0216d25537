"""A whole federation in one process: the learning core end to end, without the network.

This is the reference loop the gRPC services distribute (docs/algorithm.md, sections 1-7), and
what `flclustering local` runs. It shares every decision with the services: the partition
and the attackers (participant), the clustering and the round plan (clusterer), the
defence and merge (aggregator); participants pre-train and train with the same seeded
generators as the participant service, so with the same seed both runs select the same
participants into the same clusters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.common.figures import accuracy_summary, group_means, purity, rejections_by_layer
from services.common.homomorphic import upload_tensors
from services.common.schema import SchemaSettings
from services.common.settings import FederationSettings, TrainingSettings
from services.common.wire import nbytes
from services.core.accountant import Ledger, Step
from services.core.ckks import HeKeys
from services.core.clustering import group_deltas
from services.core.defence import RoundDefence
from services.core.device import resolve_device
from services.core.errors import ConfigError
from services.core.guard import check_merge, remember
from services.core.merge import local_steps
from services.core.model_file import ModelCard
from services.core.models import build_model
from services.core.plan import group_accuracy, plan_round, static_group
from services.core.privacy import CentralNoise, expected_counts
from services.core.quantise import (
    Compression,
    ErrorFeedback,
    PayloadError,
    decode,
    payload_bytes,
)
from services.core.quarantine import Quarantine, judge
from services.core.record import Layout, RoundRecord
from services.core.rounds import RoundOutcome, aggregate_round
from services.core.sanity import largest, unfit
from services.core.selection import poisson_rates
from services.core.strategies import get_strategy
from services.core.tensors import flatten, spec_of, unflatten
from services.experiment import ExperimentConfig
from services.participant.attacks import View, build_attack, choose_attackers
from services.participant.backdoor import success_rate
from services.participant.datasets import Dataset
from services.participant.dpsgd import DpSgd
from services.participant.examples import TensorExamples
from services.participant.partition import federation_data, shard_tensors, shards_of
from services.participant.settings import DataSettings
from services.participant.training import evaluate, local_train, pre_train_delta
from services.participant.worker import participant_generator, rounding_generator


@dataclass
class Participant:
    """One simulated data owner."""

    index: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    group: int
    attacker: bool
    gen: torch.Generator

    @property
    def samples(self) -> int:
        """Training samples, all of them (the research code forgot the other groups')."""
        return len(self.y_train)

    @property
    def train(self) -> TensorExamples:
        """Its training examples, as the training loop reads them."""
        return TensorExamples(self.x_train, self.y_train)

    @property
    def test(self) -> TensorExamples:
        """Its test examples, as evaluation reads them."""
        return TensorExamples(self.x_test, self.y_test)


# The final summary's figures, from the last round's record.
FINAL = ("mean_accuracy", "accuracy_std", "worst_accuracy", "worst_decile_accuracy")


@dataclass
class RunResult:
    """Per-round figures, the clustering and the final summary."""

    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clusters: list[dict[str, int]] = field(default_factory=list)
    clustering: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    # Differential privacy: the ledger and why training stopped before --rounds (or "").
    privacy: dict[str, Any] = field(default_factory=dict)
    # The final global model's weights and card (`model_file.write_model_file`).
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    card: ModelCard | None = None

    def add(self, record: dict[str, Any], progress: Callable[[dict], None] | None) -> None:
        """Keep a round's record and show it; the last one's summary is the final one."""
        self.rounds.append(record)
        if progress is not None:
            progress(record)
        self.final = {k: record[k] for k in FINAL}
        if record["group_accuracy"]:
            self.final["group_accuracy"] = record["group_accuracy"]
            self.final["worst_group_accuracy"] = min(record["group_accuracy"].values())


def attacker_indices(config: ExperimentConfig, groups: np.ndarray) -> set[int]:
    """Which participants attack (the same draw for local runs and simulations)."""
    a = config.adversary
    if a.attack == "none" or a.attack_rate == 0:
        return set()
    rng = np.random.default_rng(config.federation.seed + 1)
    return choose_attackers(groups, a.attack_rate, a.attack_placement, rng)


def measured(people: list[Participant], figs: list[tuple[float, float]]) -> dict[str, Any]:
    """A round's record fields from every participant's (loss, accuracy) on its own test
    split: the same for the in-process federation and the centralised baseline."""
    summary = accuracy_summary([a for _, a in figs])
    return {
        "mean_accuracy": summary.mean,
        "mean_loss": float(np.mean([lo for lo, _ in figs])),
        "accuracy_std": summary.std,
        "worst_accuracy": summary.worst,
        "worst_decile_accuracy": summary.worst_decile,
        "group_accuracy": group_means(
            {p.index: a for p, (_, a) in zip(people, figs, strict=True)},
            {p.index: p.group for p in people},
        ),
    }


def build_participants(config: ExperimentConfig, data: Dataset) -> list[Participant]:
    """Shards per participant and the attackers among them."""
    shards = shards_of(config.federation, config.data, data)
    attackers = attacker_indices(config, np.array([s.group for s in shards]))
    seed = config.federation.seed
    return [
        Participant(
            s.index,
            *shard_tensors(data, s),
            s.group,
            s.index in attackers,
            participant_generator(seed, s.index),
        )
        for s in shards
    ]


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
    """Run a federation in-process and return its figures."""
    fed, train = config.federation, config.training
    strategy = get_strategy(fed.strategy)
    settings = config.adversary.config()
    attack = build_attack(settings)  # the attackers' hooks
    if attack.needs_services:
        raise ConfigError(
            f"--attack {attack.kind} is simulated by the services only "
            f"({attack.needs_services}): use flclustering simulate"
        )
    data = federation_data(fed, config.data)
    settings.check_classes(data.num_classes)
    people = build_participants(config, data)
    device = resolve_device(config.run.device)
    model = build_model(fed.model, data.input_shape, data.num_classes, fed.seed).to(device)
    spec = spec_of(model.state_dict())
    reference = model.state_dict()
    global_w = flatten(reference, spec)
    rng = np.random.default_rng(fed.seed)  # the round plan's stream, as in the clusterer
    result = RunResult(config=config.model_dump(mode="json"))

    def load(w: torch.Tensor) -> None:
        model.load_state_dict(unflatten(w, spec, reference))

    # --dp local: every participant's own DP-SGD and ledger (pre-training spends too).
    sgd = (
        {p.index: DpSgd(config.privacy, p.samples) for p in people} if config.privacy.local else {}
    )
    # Pre-training and clustering.
    if strategy.clustered:
        start = time.perf_counter()
        deltas = torch.stack(
            [
                pre_train_delta(
                    model,
                    p.train,
                    p.gen,
                    train.adjusted,
                    train.pre_steps,
                    batch_size=train.batch_size,
                    privacy=sgd.get(p.index),
                )
                for p in people
            ]
        )
        attackers = [p.index for p in people if p.attacker]
        # Cluster steering: the attackers pool their deltas (and all send their mean).
        pooled = deltas[attackers] if attackers and attack.pools_pretrain else None
        for i in attackers:
            view = View(-1, fed.select, people[i].gen)
            deltas[i] = attack.on_pretrain(deltas[i], view, pooled)
        fit, res = group_deltas(deltas, fed.clusters, config.clustering.cluster_method, fed.seed)
        # A refused delta (never from an honest participant) leaves its owner ungrouped (-1).
        assignment = np.full(len(people), -1)
        assignment[fit.numpy()] = res.assignment
        truth = np.array([p.group for p in people])
        result.clustering = {
            "k": res.k,
            "k_from": res.k_from,
            "silhouette": res.score,
            "purity": purity(res.assignment, truth[fit.numpy()]) if (truth >= 0).all() else None,
            "seconds": time.perf_counter() - start,
        }
    else:
        assignment = np.array([static_group(strategy, i) for i in range(len(people))])
    groups = {p.index: int(assignment[p.index]) for p in people if assignment[p.index] >= 0}
    result.clusters = [
        {
            "participant": p.index,
            "cluster": int(assignment[p.index]),
            "group": p.group,
            "attacker": int(p.attacker),
        }
        for p in people
    ]
    # Personalised: each cluster's own model (a cluster no update reached serves the global).
    cluster_w: dict[int, torch.Tensor] = {}

    def base_of(i: int) -> torch.Tensor:
        return cluster_w.get(groups.get(i, -1), global_w) if fed.personalise else global_w

    scheme = Compression.parse(fed.compression)
    sealed = None
    if fed.secure == "he":  # one key pair; the "aggregator" holds the public context only
        secret = HeKeys.create()
        sealed = (secret, HeKeys.from_bytes(secret.public_bytes(), "public context"))
    feedback = {p.index: ErrorFeedback() for p in people}  # keyed as `rows` are
    cpu_gens = {p.index: rounding_generator(fed.seed, p.index) for p in people}

    central = CentralPlan.of(config, groups) if config.privacy.central else None
    published: dict[int, float] = {}  # everyone's accuracy of the current global model
    figs: list[tuple[float, float]] = []  # everyone's (loss, accuracy) of it
    quarantine = Quarantine()  # who may train after failed rounds (as the clusterer's)
    steps: list[float] = []  # the last accepted merges' lengths (the aggregator's guard)
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
            fed.select,
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
        for i in plan.selected:
            p = people[i]
            base = base_of(i)
            load(base)
            if strategy.needs_losses:
                losses.append(evaluate(model, p.train)[0])
            x, y = p.x_train, p.y_train
            view = View(rnd, len(plan.selected), p.gen)
            if p.attacker:
                x, y = attack.on_data(x, y, view)
            local_train(model, TensorExamples(x, y), train, rnd, p.gen, privacy=sgd.get(i))
            w = flatten(model.state_dict(), spec)
            if p.attacker and attack.crafts_update(rnd) and not attack.pools_update:
                w = attack.on_update(w, base, view)
            rows.append(i)
            updates.append(w - base)
        if attack.pools_update and attack.crafts_update(rnd):
            # The round's attackers pool their honest deltas and all send one crafted delta.
            colluders = [k for k, i in enumerate(rows) if people[i].attacker]
            if colluders:
                pooled = torch.stack([updates[k] for k in colluders])
                for k in colluders:
                    view = View(rnd, len(rows), people[rows[k]].gen)
                    updates[k] = attack.on_pooled(pooled, view).clone()
        # What travels: float32 weights, or each delta compressed as its participant would
        # (top-k with its own residual); the aggregator decodes before the defence.
        upload_bytes = sum(nbytes(s) for s in spec) * len(updates)
        if scheme.scheme != "none":
            upload_bytes = 0
            for k, i in enumerate(rows):
                payload = feedback[i].send(updates[k], spec, scheme, cpu_gens[i])
                feedback[i].commit()  # in process, every update reaches the aggregator
                upload_bytes += payload_bytes(payload)
                try:
                    decoded = decode(payload, spec, scheme)
                except PayloadError:  # a non-finite delta: refused, as NaN weights would be
                    decoded = torch.full_like(updates[k].cpu(), float("nan"))
                updates[k] = decoded.to(updates[k].device)
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
    last = result.rounds[-1]
    for key in ("mean_accuracy", "accuracy_std", "worst_accuracy", "group_accuracy"):
        if f"personal_{key}" in last:
            result.final[f"personal_{key}"] = last[f"personal_{key}"]
    if last.get("personal_group_accuracy"):
        result.final["personal_worst_group_accuracy"] = min(
            last["personal_group_accuracy"].values()
        )
    if "backdoor_success_rate" in last:
        result.final["backdoor_success_rate"] = last["backdoor_success_rate"]
    if central is not None:
        result.privacy.update(central.summary())
        result.final["epsilon"] = result.privacy["epsilon"]
    elif sgd:
        result.privacy.update(local_summary(config, sgd, train, len(result.rounds)))
        result.final["epsilon"] = result.privacy["epsilon"]
    result.weights = dict(unflatten(global_w, spec, reference))
    result.card = card_of(config, data, result.final)
    return result


def local_summary(
    config: ExperimentConfig, sgd: dict[int, DpSgd], train: TrainingSettings, rounds: int
) -> dict[str, Any]:
    """results.json's privacy block under --dp local: every participant's own epsilon."""
    p = config.privacy
    eps = {str(i): dp.epsilon for i, dp in sorted(sgd.items())}
    return {
        "mode": "local",
        "epsilon": max(eps.values()),
        "mean_epsilon": float(np.mean(list(eps.values()))),
        "delta": p.dp_delta,
        "budget": p.dp_epsilon,
        "noise_multiplier": p.dp_noise,
        "participants": eps,
        "stopped_participants": sum(1 for dp in sgd.values() if dp.refuses(train)),
        "rounds": rounds,
        "accountant": "Renyi DP of the Poisson-sampled Gaussian (Opacus), per participant",
        "adjacency": "add or remove one example of a participant",
    }


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


def card_of(config: ExperimentConfig, data: Dataset, final: dict[str, Any]) -> ModelCard:
    """The card of a run's final global model: how to use it, and what it reached."""
    fed = config.federation
    facts = {
        "strategy": fed.strategy,
        "rounds": fed.rounds,
        "seed": fed.seed,
        "mean_accuracy": final.get("mean_accuracy"),
    }
    return model_card(fed.model, fed.dataset, data, facts)


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


def model_card(model: str, dataset: str, data: Dataset, facts: dict[str, Any]) -> ModelCard:
    """The card of a `model` trained on `data`, with `facts` about where it came from."""
    channels = data.input_shape[0]
    return ModelCard(
        model,
        dataset,
        data.input_shape,
        data.classes,
        data.mean or (0.0,) * channels,  # generated features are not standardised
        data.std or (1.0,) * channels,
        facts,
    )
