"""Who attacks, how and when (simulations only): the settings and the draw of attackers.

Apart from the attack functions (services.participant.attacks, over tensors), so that the
settings and `flclustering simulate` do not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field

from services.common.errors import ConfigError
from services.common.settings import Settings, choice

ATTACKS = ("none", "scaling", "label-flip", "sign-flip", "gaussian", "same-value")
PLACEMENTS = ("per-group", "random")


@dataclass(frozen=True)
class AttackConfig:
    """Which attack, how strong, and in which rounds."""

    kind: str = "none"
    factor: float = -1.0  # scaling: weights times factor; the research code sends -w
    every: int = 5  # model attacks fire in rounds r with (r + 1) % every == 0
    noise_std: float = 1.0  # gaussian
    value: float = 0.0  # same-value: every weight set to this
    flip_from: int = 0  # label flip: this class is relabelled as flip_to
    flip_to: int = 9

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACKS)}")
        if self.every < 1:
            raise ConfigError(f"attack period must be at least 1 round, got {self.every}")

    @property
    def poisons_data(self) -> bool:
        """Whether the attack changes training data rather than the sent model."""
        return self.kind == "label-flip"

    def fires(self, round_: int) -> bool:
        """Whether a model attack fires in this round (data attacks fire always)."""
        if self.kind == "none":
            return False
        return self.poisons_data or (round_ + 1) % self.every == 0


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


class AttackSettings(Settings):
    """SIMULATION ONLY: which participants attack, how and when."""

    attack: Annotated[str, choice(ATTACKS)] = Field("none", description="attack to simulate")
    attack_rate: float = Field(
        0.0, ge=0, lt=1, description="share of participants that attack (simulations)"
    )
    attack_factor: float = Field(-1.0, description="scaling attack: weights times this")
    attack_every: int = Field(5, ge=1, description="model attacks fire every this many rounds")
    attack_placement: Annotated[str, choice(PLACEMENTS)] = Field(
        "per-group", description="spread attackers over the true groups, or at random"
    )

    def config(self) -> AttackConfig:
        """The attack as the participant applies it."""
        return AttackConfig(self.attack, self.attack_factor, self.attack_every)
