"""Strategies by name: how participants are grouped, the rule inside a group, the merge.

Every place that behaves differently per strategy asks the strategy (its `grouping`, `rule`,
`merge`, `defended`), never its name: the clusterer's round plan, the aggregator's round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.core.registry import Registry

Grouping = Literal["clusters", "one", "each"]


@dataclass(frozen=True)
class Strategy:
    """How a round turns updates into the next global model."""

    name: str
    grouping: Grouping  # clusters: pre-train and cluster; one: a single group; each: per member
    rule: str  # robust rule inside each group (core.robust.RULES)
    merge: str  # global merge of the groups (core.merge.MERGES)
    defended: bool  # norm screen and cluster check on

    @property
    def clustered(self) -> bool:
        """Whether participants pre-train and are clustered before round 0."""
        return self.grouping == "clusters"

    @property
    def needs_accuracy(self) -> bool:
        """Whether the merge weighs groups by how well the global model serves them."""
        return self.merge == "accuracy"

    @property
    def needs_losses(self) -> bool:
        """Whether the merge needs each participant's loss of the global model (q-FFL)."""
        return self.merge == "qffl"


STRATEGIES: Registry[Strategy] = Registry(
    "strategy",
    {
        s.name: s
        for s in (
            Strategy("flclustering", "clusters", "centred-clipping", "accuracy", True),
            Strategy("flclustering-multi-krum", "clusters", "multi-krum", "accuracy", True),
            Strategy("centred-clipping", "one", "centred-clipping", "mean", False),
            Strategy("flclustering-krum", "clusters", "krum", "accuracy", False),
            Strategy("flclustering-fedavg", "clusters", "fedavg", "accuracy", False),
            Strategy("fedavg", "one", "fedavg", "mean", False),
            Strategy("krum", "one", "krum", "mean", False),
            Strategy("multi-krum", "one", "multi-krum", "mean", False),
            Strategy("median", "one", "median", "mean", False),
            Strategy("trimmed-mean", "one", "trimmed-mean", "mean", False),
            Strategy("alpha-fedavg", "each", "fedavg", "accuracy", False),
            Strategy("qffl", "one", "fedavg", "qffl", False),
        )
    },
)


def get_strategy(name: str) -> Strategy:
    """A strategy by name (ConfigError naming the choices when unknown)."""
    return STRATEGIES[name]
