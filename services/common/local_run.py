"""A whole federation in one process: the learning core end to end, without the network.

This is the reference loop the gRPC services distribute (ALGORITHM.md sections 1-7): it
is how the defence was calibrated, and what `flclustering local` runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from services.aggregator.rounds import aggregate_round
from services.clusterer.clustering import cluster
from services.clusterer.selection import fair_select
from services.common.errors import ConfigError
from services.common.figures import accuracy_summary, purity
from services.common.strategies import get_strategy
from services.common.tensors import flatten, spec_of, unflatten
from services.participant.attacks import AttackConfig, apply_model_attack, flip_labels
from services.participant.datasets import Dataset, load_dataset
from services.participant.device import resolve_device
from services.participant.models import build_model
from services.participant.partition import partition
from services.participant.training import TrainConfig, evaluate, local_train, pre_train_delta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on; recorded with its results."""

    strategy: str = "flclustering"
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = True
    partition: str = "practical-noniid"
    participants: int = 30
    groups: int = 3  # ground-truth groups of practical-noniid
    clusters: int | None = 3  # None: choose k automatically
    select: int = 15
    rounds: int = 30
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    model: str = "cnn"
    q: float = 0.5
    eval_per_cluster: int = 5
    pre_steps: int = 20
    adjusted: bool = True
    byzantine_fraction: float = 0.2
    attack: str = "none"
    attack_rate: float = 0.0
    attack_factor: float = -1.0
    attack_every: int = 5
    attack_placement: str = "per-group"
    alpha: float = 0.5
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda[:n]

    def __post_init__(self) -> None:
        get_strategy(self.strategy)
        AttackConfig(self.attack, self.attack_factor, self.attack_every)
        if self.participants < 2:
            raise ConfigError("a federation needs at least 2 participants")
        if not 0 <= self.attack_rate < 1:
            raise ConfigError(f"attack rate must be in [0, 1), got {self.attack_rate}")
        if self.attack_placement not in ("per-group", "random"):
            raise ConfigError("attack placement must be per-group or random")
        if self.rounds < 1 or self.select < 1 or self.local_epochs < 1:
            raise ConfigError("rounds, select and local epochs must be at least 1")


@dataclass
class Participant:
    """One simulated data owner."""

    index: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    group: int
    attacker: bool = False

    @property
    def samples(self) -> int:
        """Training samples, all of them (the research code forgot the other groups')."""
        return len(self.y_train)


@dataclass
class RunResult:
    """Per-round figures, the clustering and the final summary."""

    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clusters: list[dict[str, int]] = field(default_factory=list)
    clustering: dict[str, Any] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)


def choose_attackers(
    groups: np.ndarray, rate: float, placement: str, rng: np.random.Generator
) -> set[int]:
    """round(rate * N) attackers, spread evenly over true groups (per-group) or at random."""
    n = len(groups)
    count = round(rate * n)
    if count == 0:
        return set()
    if placement == "random" or (groups < 0).all():
        return {int(i) for i in rng.choice(n, count, replace=False)}
    chosen: list[int] = []
    members = [rng.permutation(np.flatnonzero(groups == g)).tolist() for g in np.unique(groups)]
    while len(chosen) < count:
        for m in members:
            if m and len(chosen) < count:
                chosen.append(m.pop())
    return set(chosen)


def build_participants(config: RunConfig, data: Dataset) -> list[Participant]:
    """Shards per participant and the attackers among them."""
    shards = partition(
        data.y_train.numpy(),
        data.y_test.numpy(),
        config.partition,
        config.participants,
        config.seed,
        data.num_classes,
        config.groups,
        config.alpha,
    )
    groups = np.array([s.group for s in shards])
    attackers = choose_attackers(
        groups, config.attack_rate, config.attack_placement, np.random.default_rng(config.seed + 1)
    )
    return [
        Participant(
            s.index,
            data.x_train[s.train],
            data.y_train[s.train],
            data.x_test[s.test],
            data.y_test[s.test],
            s.group,
            s.index in attackers,
        )
        for s in shards
    ]


def run_local(
    config: RunConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Run a federation in-process and return its figures."""
    strategy = get_strategy(config.strategy)
    attack = AttackConfig(config.attack, config.attack_factor, config.attack_every)
    data = load_dataset(config.dataset, config.data_dir, config.download)
    people = build_participants(config, data)
    device = resolve_device(config.device)
    model = build_model(config.model, data.input_shape, data.num_classes, config.seed).to(device)
    spec = spec_of(model.state_dict())
    reference = model.state_dict()
    global_w = flatten(reference, spec)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 2)
    train_cfg = TrainConfig(config.local_epochs, config.batch_size, config.lr, config.momentum)
    result = RunResult(config=asdict(config))

    def load(w: torch.Tensor) -> None:
        model.load_state_dict(unflatten(w, spec, reference))

    # Pre-training and clustering.
    if strategy.clustered:
        start = time.perf_counter()
        deltas = torch.stack(
            [
                pre_train_delta(model, p.x_train, p.y_train, gen, config.adjusted, config.pre_steps)
                for p in people
            ]
        )
        res = cluster(deltas, k=config.clusters, seed=config.seed)
        assignment = res.assignment
        truth = np.array([p.group for p in people])
        result.clustering = {
            "k": res.k,
            "k_from": res.k_from,
            "silhouette": res.score,
            "purity": purity(assignment, truth) if (truth >= 0).all() else None,
            "seconds": time.perf_counter() - start,
        }
    elif strategy.per_participant:
        assignment = np.arange(len(people))
    else:
        assignment = np.zeros(len(people), dtype=int)
    result.clusters = [
        {
            "participant": p.index,
            "cluster": int(assignment[p.index]),
            "group": p.group,
            "attacker": int(p.attacker),
        }
        for p in people
    ]
    for rnd in range(config.rounds):
        start = time.perf_counter()
        # Fair selection; per-participant groups select plain random S.
        if strategy.per_participant:
            chosen = sorted(rng.choice(len(people), min(config.select, len(people)), False))
            selected = {int(i): [int(i)] for i in chosen}
        else:
            selected = fair_select(assignment, config.select, rng)
        # Accuracy (and loss) of the current global model per group, for the fair merge.
        group_acc: dict[int, float] = {}
        group_loss: dict[int, float] = {}
        if rnd > 0 and strategy.merge in ("accuracy", "qffl"):
            load(global_w)
            for c in selected:
                pool = np.flatnonzero(assignment == c)
                sample = rng.choice(pool, min(config.eval_per_cluster, len(pool)), replace=False)
                figures = [evaluate(model, people[i].x_test, people[i].y_test) for i in sample]
                group_acc[c] = float(np.mean([a for _, a in figures]))
                group_loss[c] = float(np.mean([lo for lo, _ in figures]))
            if strategy.merge == "qffl":
                for members in selected.values():
                    for i in members:
                        group_loss[i] = evaluate(model, people[i].x_train, people[i].y_train)[0]
        rows: list[int] = []
        labels: list[int] = []
        updates: list[torch.Tensor] = []
        for c, members in selected.items():
            for i in members:
                p = people[i]
                load(global_w)
                y = flip_labels(p.y_train) if p.attacker and attack.poisons_data else p.y_train
                local_train(model, p.x_train, y, train_cfg, rnd, gen)
                w = flatten(model.state_dict(), spec)
                if p.attacker:
                    w = apply_model_attack(attack, w, global_w, rnd, gen)
                rows.append(i)
                labels.append(c)
                updates.append(w - global_w)
        deltas = torch.stack(updates)
        losses = [group_loss.get(i, 1.0) for i in rows] if strategy.merge == "qffl" else None
        result_round = aggregate_round(
            global_w,
            deltas,
            labels,
            [people[i].samples for i in rows],
            strategy,
            rnd,
            group_acc,
            config.q,
            config.byzantine_fraction,
            losses,
            train_cfg.lr_at(rnd),
        )
        global_w = result_round.global_weights
        outcome = result_round.defence
        rejected_attackers = sum(people[rows[i]].attacker for i in outcome.rejected_updates)
        # Every participant evaluates the new global model on its own test split.
        load(global_w)
        figs = [evaluate(model, p.x_test, p.y_test) for p in people]
        summary = accuracy_summary([a for _, a in figs])
        record = {
            "round": rnd,
            "mean_accuracy": summary.mean,
            "mean_loss": float(np.mean([lo for lo, _ in figs])),
            "accuracy_std": summary.std,
            "worst_accuracy": summary.worst,
            "worst_decile_accuracy": summary.worst_decile,
            "duration_s": time.perf_counter() - start,
            "rejected": len(outcome.rejected_updates),
            "rejected_attackers": rejected_attackers,
            "attackers_selected": sum(people[i].attacker for i in rows),
            "rejected_clusters": len(outcome.rejected_clusters),
            "fallbacks": len(outcome.fallbacks),
        }
        result.rounds.append(record)
        if progress is not None:
            progress(record)
    last = result.rounds[-1]
    result.final = {
        "mean_accuracy": last["mean_accuracy"],
        "accuracy_std": last["accuracy_std"],
        "worst_accuracy": last["worst_accuracy"],
        "worst_decile_accuracy": last["worst_decile_accuracy"],
    }
    return result
