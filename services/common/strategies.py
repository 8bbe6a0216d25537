"""Strategies by name: whether participants are clustered, the rule inside a group, the merge.

The unclustered strategies treat all participants as one cluster, so one code path serves
them all (alpha-FedAvg treats each participant as its own group for the q-weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import ConfigError


@dataclass(frozen=True)
class Strategy:
    """How a round turns updates into the next global model."""

    name: str
    clustered: bool
    rule: str  # robust rule inside each group
    merge: str  # "accuracy" (q-weights), "samples", "mean" or "qffl"
    defended: bool  # norm screen and cluster check on
    per_participant: bool = False  # alpha-FedAvg: each participant its own group


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("flclustering", True, "multi-krum", "accuracy", True),
        Strategy("flclustering-krum", True, "krum", "accuracy", False),
        Strategy("flclustering-fedavg", True, "fedavg", "accuracy", False),
        Strategy("fedavg", False, "fedavg", "mean", False),
        Strategy("krum", False, "krum", "mean", False),
        Strategy("multi-krum", False, "multi-krum", "mean", False),
        Strategy("median", False, "median", "mean", False),
        Strategy("trimmed-mean", False, "trimmed-mean", "mean", False),
        Strategy("alpha-fedavg", False, "fedavg", "accuracy", False, per_participant=True),
        Strategy("qffl", False, "fedavg", "qffl", False),
    )
}


def get_strategy(name: str) -> Strategy:
    """A strategy by name."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
