"""One round's plan as a pure function: who is selected in which group, who evaluates.

The clusterer's coordinator and the in-process federation (`flclustering local`) both call
`plan_round`, so with the same seed they select the same participants (docs/algorithm.md,
section 4). Identifiers are any sortable ids: participant names here, indices in-process.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from services.core.selection import fair_select, poisson_select, random_select
from services.core.strategies import Strategy

P = TypeVar("P", bound=Hashable)


@dataclass(frozen=True)
class RoundPlan(Generic[P]):
    """Selected participants with their group, and who evaluates the model beforehand."""

    round: int
    selected: dict[P, int]  # participant -> group, in id order
    evaluators: tuple[P, ...]  # evaluate the current global model for the fair merge


def static_group(strategy: Strategy, position: int) -> int | None:
    """The group of the participant at `position` when the strategy does not cluster."""
    if strategy.grouping == "one":
        return 0
    if strategy.grouping == "each":
        return position
    return None


def plan_round(
    strategy: Strategy,
    groups: Mapping[P, int],
    round_: int,
    select: int,
    eval_per_group: int,
    rng: np.random.Generator,
    rates: Mapping[int, float] | None = None,
) -> RoundPlan[P]:
    """Select fairly (the same number per group, the remainder rotating; per-participant
    groups draw `select` at random), then, when the merge needs it and a model has been
    trained, draw up to `eval_per_group` evaluators per selected group among its members.

    A `select` below the number of groups takes one per group (every group is served).
    With `rates` (differential privacy: `selection.poisson_rates` of the federation's
    groups) every participant is drawn on its own with its group's rate instead.
    """
    ids = sorted(groups)  # type: ignore[type-var]
    if not ids:
        return RoundPlan(round_, {}, ())
    labels = np.array([groups[p] for p in ids])
    if rates is not None:
        picks = poisson_select(labels, rates, rng)
        selected = {ids[i]: c for c, members in picks.items() for i in members}
        selected = {p: selected[p] for p in ids if p in selected}
    elif strategy.grouping == "each":
        chosen = random_select(len(ids), min(select, len(ids)), rng)
        selected = {ids[i]: int(labels[i]) for i in chosen}
    else:
        picks = fair_select(labels, max(select, len(set(labels.tolist()))), rng, round_)
        selected = {ids[i]: c for c, members in picks.items() for i in members}
        selected = {p: selected[p] for p in ids if p in selected}
    evaluators: list[P] = []
    if strategy.needs_accuracy and round_ > 0:
        if strategy.grouping == "each":
            evaluators = list(selected)
        else:
            for c in sorted(set(selected.values())):
                pool = [p for p in ids if groups[p] == c]
                take = rng.choice(len(pool), min(eval_per_group, len(pool)), replace=False)
                evaluators += [pool[i] for i in sorted(take)]
    return RoundPlan(round_, selected, tuple(evaluators))


def evaluation_sample(groups: Mapping[P, int], limit: int, seed: int, round_: int) -> list[P]:
    """Who evaluates the model published after round_: everyone when there are at most
    `limit` (0: no limit), else about `limit` drawn from every group in proportion to its
    size (at least one each), seeded by (seed, round) so a restarted clusterer asks the same.

    At scale the evaluation of every member after every round is a burst of N tasks and N
    reports for a statistic that a sample estimates well (Flower's fraction_evaluate).
    """
    ids = sorted(groups)  # type: ignore[type-var]
    if limit <= 0 or len(ids) <= limit:
        return ids
    rng = np.random.default_rng([seed, max(round_, 0), 0xE7A1])
    by_group: dict[int, list[P]] = {}
    for p in ids:
        by_group.setdefault(groups[p], []).append(p)
    chosen: list[P] = []
    for g in sorted(by_group):
        pool = by_group[g]
        take = min(len(pool), max(1, round(limit * len(pool) / len(ids))))
        chosen += [pool[i] for i in rng.choice(len(pool), take, replace=False)]
    return sorted(chosen)  # type: ignore[type-var]


def group_accuracy(
    accuracies: Mapping[P, float], groups: Mapping[P, int], selected: Mapping[P, int]
) -> dict[int, float]:
    """Median accuracy per selected group over the evaluators that answered.

    The median, not the mean: the accuracies are what participants report, and a minority
    of a group's evaluators reporting 0 (or 1) must not move its merge weight (with the
    mean, one liar of five reporting 0 moves a group served at 0.95 to 0.76).
    """
    out: dict[int, float] = {}
    for c in sorted(set(selected.values())):
        accs = [a for p, a in accuracies.items() if groups.get(p) == c]
        if accs:
            out[c] = float(np.median(accs))
    return out
