"""One round's aggregation as a pure function: defence inside clusters, then the merge.

The aggregator service and the in-process federation both call this, so the algorithm
exists once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from services.aggregator.defence import DefenceConfig, RoundDefence, defend
from services.aggregator.merge import q_weights, qffl_merge, weighted_merge
from services.common.errors import ConfigError
from services.common.strategies import Strategy

NORM_FACTOR = 3.0
CLUSTER_FACTOR = 3.0


@dataclass(frozen=True)
class RoundOutcome:
    """The next global model, the defence's report and each cluster's merge weight."""

    global_weights: torch.Tensor
    defence: RoundDefence
    cluster_weights: dict[int, float]


def defence_for(strategy: Strategy, byzantine_fraction: float) -> DefenceConfig:
    """The defence a strategy runs: its rule, plus the screens when it is defended."""
    on = NORM_FACTOR if strategy.defended else None
    return DefenceConfig(
        strategy.rule, byzantine_fraction, on, CLUSTER_FACTOR if strategy.defended else None
    )


def aggregate_round(
    global_w: torch.Tensor,
    deltas: torch.Tensor,
    clusters: Sequence[int],
    samples: Sequence[int],
    strategy: Strategy,
    round_: int,
    cluster_accuracy: Mapping[int, float],
    q: float = 0.5,
    byzantine_fraction: float = 0.2,
    losses: Sequence[float] | None = None,
    lr: float = 0.05,
) -> RoundOutcome:
    """Aggregate one round's deltas (rows of `deltas`, against `global_w`) into the next model.

    Round 0, or a round without accuracies, merges clusters by their plain mean; later rounds
    weigh cluster c by acc_c^-q (strategy.merge == "accuracy"). q-FFL uses the losses of the
    global model each participant reported before training.
    """
    outcome = defend(deltas, clusters, defence_for(strategy, byzantine_fraction), samples)
    if strategy.merge == "qffl":
        if losses is None or len(losses) != deltas.shape[0]:
            raise ConfigError("q-FFL needs one pre-training loss per update")
        keep = [i for i in range(deltas.shape[0]) if i not in outcome.rejected_updates]
        if not keep:
            return RoundOutcome(global_w, outcome, {})
        idx = torch.tensor(keep)
        new = qffl_merge(
            global_w, global_w + deltas.index_select(0, idx), [losses[i] for i in keep], lr=lr
        )
        return RoundOutcome(new, outcome, {})
    if not outcome.cluster_deltas:
        return RoundOutcome(global_w, outcome, {})
    cs = sorted(outcome.cluster_deltas)
    stacked = torch.stack([outcome.cluster_deltas[c] for c in cs])
    use_q = strategy.merge == "accuracy" and round_ > 0 and all(c in cluster_accuracy for c in cs)
    if use_q:
        weights = q_weights([cluster_accuracy[c] for c in cs], q)
    else:
        weights = torch.full((len(cs),), 1.0 / len(cs), dtype=torch.float64)
    new = global_w + weighted_merge(stacked, weights)
    return RoundOutcome(new, outcome, {c: float(w) for c, w in zip(cs, weights, strict=True)})
