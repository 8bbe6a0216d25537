"""A federation in one process before and after its rounds: the participants with their
shards and attackers, the model, pre-training and clustering, what uploads cost, and the
run's result. `flclustering local` runs its rounds on it synchronously (services/local.py)
or asynchronously (services/local_async.py), so both start from the same federation.

Participants pre-train and train with the same seeded generators as the participant
service, so with the same seed the services and both loops select the same participants
into the same clusters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.figures import accuracy_summary, group_means, purity
from services.common.settings import TrainingSettings
from services.common.wire import nbytes
from services.core.clustering import MinCluster, group_deltas
from services.core.defence import DefenceConfig
from services.core.device import resolve_device
from services.core.errors import ConfigError
from services.core.merge import local_steps
from services.core.model_file import ModelCard
from services.core.models import build_model
from services.core.plan import static_group
from services.core.quantise import Compression, ErrorFeedback, PayloadError, decode, payload_bytes
from services.core.robust import rule_minimum
from services.core.rounds import defence_for
from services.core.strategies import Strategy, get_strategy
from services.core.tensors import TensorSpec, flatten, spec_of, unflatten
from services.core.virtual_clock import VirtualClock
from services.experiment import ExperimentConfig
from services.participant.adversary import AttackConfig
from services.participant.attacks import Attack, View, build_attack, choose_attackers
from services.participant.datasets import Dataset
from services.participant.dpsgd import DpSgd
from services.participant.examples import TensorExamples
from services.participant.partition import federation_data, shard_tensors, shards_of
from services.participant.training import pre_train_delta
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
    # Simulated devices: their slowness factors, dropouts and the virtual clock's scale.
    devices: dict[str, Any] = field(default_factory=dict)
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


@dataclass
class Federation:
    """A federation ready for round 0: its participants, model and groups (after
    pre-training and clustering), their devices' clock, and the result its rounds fill."""

    config: ExperimentConfig
    strategy: Strategy
    settings: AttackConfig
    attack: Attack  # the attackers' hooks
    data: Dataset
    people: list[Participant]
    model: nn.Module
    spec: tuple[TensorSpec, ...]
    reference: dict[str, torch.Tensor]
    w0: torch.Tensor  # the initial global model, flat
    sgd: dict[int, DpSgd]  # --dp local: every participant's own DP-SGD and ledger
    groups: dict[int, int]  # participant -> cluster (those left ungrouped are absent)
    clock: VirtualClock
    result: RunResult

    def load(self, w: torch.Tensor) -> None:
        """Load flat weights into the shared model."""
        self.model.load_state_dict(unflatten(w, self.spec, self.reference))

    def steps(self, examples: int) -> int:
        """SGD steps of one training task on `examples` (what the virtual clock counts)."""
        train = self.config.training
        return local_steps([examples], train.local_epochs, train.batch_size)[0]


def prepare(config: ExperimentConfig) -> Federation:
    """Shards, attackers and the model; pre-training and clustering when the strategy
    clusters (the attackers' steering included). Everything before round 0."""
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
    w0 = flatten(reference, spec)
    result = RunResult(config=config.model_dump(mode="json"))
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
        # Cluster steering: the attackers pool their deltas (and all send their mean);
        # omniscient, they know every participant's (and the defence's settings).
        omniscient = settings.knowledge == "omniscient"
        pooled = None
        if attackers and attack.pools_pretrain:
            pooled = deltas.clone() if omniscient else deltas[attackers]
        mine = tuple(p.attacker for p in people) if omniscient else None
        defence = defence_for(strategy, config.defence) if omniscient else None
        for i in attackers:
            view = View(-1, fed.select, people[i].gen, mine=mine, defence=defence)
            deltas[i] = attack.on_pretrain(deltas[i], view, pooled)
        fit, res = group_deltas(
            deltas,
            fed.clusters,
            config.clustering.cluster_method,
            fed.seed,
            min_size=MinCluster(
                rule_minimum(strategy.rule, config.defence.byzantine_fraction),
                config.clustering.min_cluster,
            ),
        )
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
    devices = config.devices
    clock = VirtualClock(len(people), devices.speed_spread, devices.dropout, fed.seed)
    return Federation(
        config,
        strategy,
        settings,
        attack,
        data,
        people,
        model,
        spec,
        reference,
        w0,
        sgd,
        groups,
        clock,
        result,
    )


def collude(
    attack: Attack,
    deltas: list[torch.Tensor],
    mine: list[bool],
    clusters: list[int],
    views: list[View],
    defence: DefenceConfig,
) -> list[torch.Tensor]:
    """The round's deltas with each colluder's (`mine`) replaced by the delta it crafts:
    from the colluders' own honest deltas (--attack-knowledge own, as the services pool
    them), or from every participant's, knowing each row's cluster and the round's defence
    (omniscient). `views[k]`: row k's participant's view of the round."""
    colluders = [k for k, m in enumerate(mine) if m]
    if not colluders:
        return deltas
    out = list(deltas)
    if attack.config.knowledge != "omniscient":
        pooled = torch.stack([deltas[k] for k in colluders])
        for k in colluders:
            out[k] = attack.on_pooled(pooled, views[k]).clone()
        return out
    pooled = torch.stack(deltas)
    for k in colluders:
        view = replace(views[k], mine=tuple(mine), clusters=tuple(clusters), defence=defence)
        out[k] = attack.on_pooled(pooled, view).clone()
    return out


class Uplink:
    """What travels from each participant: float32 weights, or its delta compressed as its
    participant would (top-k with its own residual, its own rounding stream); the
    aggregator decodes before the defence."""

    def __init__(
        self, config: ExperimentConfig, people: list[Participant], spec: tuple[TensorSpec, ...]
    ) -> None:
        self.scheme = Compression.parse(config.federation.compression)
        self.spec = spec
        self.feedback = {p.index: ErrorFeedback() for p in people}
        self.gens = {p.index: rounding_generator(config.federation.seed, p.index) for p in people}
        self.plain = sum(nbytes(s) for s in spec)  # float32 weights

    def send(self, participant: int, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The delta as the aggregator decodes it, and the bytes its upload cost (an
        upload sent here was accepted: its residual is kept)."""
        if self.scheme.scheme == "none":
            return delta, self.plain
        payload = self.feedback[participant].send(
            delta, self.spec, self.scheme, self.gens[participant]
        )
        self.feedback[participant].commit()
        try:
            decoded = decode(payload, self.spec, self.scheme)
        except PayloadError:  # a non-finite delta: refused, as NaN weights would be
            decoded = torch.full_like(delta.cpu(), float("nan"))
        return decoded.to(delta.device), payload_bytes(payload)


def finish(fl: Federation, global_w: torch.Tensor, rounds: int) -> RunResult:
    """The result after the last round (`rounds` made): the final summary's extras from
    the last record, --dp local's ledgers, the devices, the final model and its card."""
    result, config = fl.result, fl.config
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
    if fl.sgd:
        result.privacy.update(local_summary(config, fl.sgd, config.training, rounds))
        result.final["epsilon"] = result.privacy["epsilon"]
    steps = {p.index: fl.steps(p.samples) for p in fl.people}
    result.devices = fl.clock.summary(config.pace.mode, steps)
    result.weights = dict(unflatten(global_w, fl.spec, fl.reference))
    result.card = card_of(config, fl.data, result.final)
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
