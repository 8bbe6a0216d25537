"""One round's aggregation as a pure function: defence inside clusters, then the merge.

The aggregator service and the in-process federation both call this, so the algorithm
exists once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from services.aggregator.defence import DefenceConfig, RoundDefence, defend
from services.aggregator.merge import MERGES, MergeInputs
from services.common.settings import DefenceSettings
from services.common.strategies import Strategy


@dataclass(frozen=True)
class RoundOutcome:
    """The next global model, the defence's report and each cluster's merge weight."""

    global_weights: torch.Tensor
    defence: RoundDefence
    cluster_weights: dict[int, float]


def defence_for(strategy: Strategy, settings: DefenceSettings) -> DefenceConfig:
    """The defence a strategy runs: its rule, plus the screens when it is defended."""
    return DefenceConfig(
        strategy.rule,
        settings.byzantine_fraction,
        settings.norm_factor if strategy.defended else None,
        settings.cluster_factor if strategy.defended else None,
    )


def aggregate_round(
    global_w: torch.Tensor,
    deltas: torch.Tensor,
    clusters: Sequence[int],
    samples: Sequence[int],
    strategy: Strategy,
    round_: int,
    cluster_accuracy: Mapping[int, float],
    defence: DefenceSettings,
    losses: Sequence[float] | None = None,
    lr: float = 0.05,
) -> RoundOutcome:
    """Aggregate one round's deltas (rows of `deltas`, against `global_w`) into the next model.

    The strategy's merge decides the weights: the q-weighted merge weighs cluster c by
    acc_c^-q from round 1 on; q-FFL uses the losses of the global model each participant
    reported before training.
    """
    outcome = defend(deltas, clusters, defence_for(strategy, defence), samples)
    kept = [i for i in range(deltas.shape[0]) if i not in outcome.rejected_updates]
    inputs = MergeInputs(
        global_w,
        outcome.cluster_deltas,
        deltas,
        kept,
        round_,
        cluster_accuracy,
        losses,
        defence.q,
        lr,
    )
    new, weights = MERGES[strategy.merge](inputs)
    return RoundOutcome(new, outcome, weights)
