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

# Attacks that craft one delta from the colluders' honest ones (services/participant/
# collusion.py): small steps, close to the honest updates, every round by default.
COLLUDING = ("alie", "ipm", "min-max", "min-sum")
ATTACKS = (
    "none",
    "scaling",
    "label-flip",
    "sign-flip",
    "gaussian",
    "same-value",
    *COLLUDING,
    "lying-evaluation",
)
PLACEMENTS = ("per-group", "random")
PERTURBATIONS = ("std", "unit", "sign")  # min-max / min-sum: the direction from the mean
LOUD_EVERY = 5  # model attacks that a norm screen sees fire every 5th round by default


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
    z: float | None = None  # alie: None derives z from the round's size and the colluders
    epsilon: float = 0.1  # ipm: the colluders send -epsilon times their mean delta
    perturbation: str = "std"  # min-max, min-sum: the direction away from the mean
    lie: float = 0.0  # lying-evaluation: the accuracy reported in every evaluation

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACKS)}")
        if self.every < 1:
            raise ConfigError(f"attack period must be at least 1 round, got {self.every}")
        if self.perturbation not in PERTURBATIONS:
            raise ConfigError(
                f"unknown perturbation {self.perturbation!r}; choose one of "
                f"{', '.join(PERTURBATIONS)}"
            )
        if not 0.0 <= self.lie <= 1.0:
            raise ConfigError(f"a reported accuracy lies in [0, 1], got {self.lie}")

    def describe(self) -> str:
        """The attack and the settings it uses, for the attacker's log line."""
        if self.poisons_data:
            return f"{self.kind}, class {self.flip_from} as {self.flip_to}"
        if self.lies:
            return f"{self.kind}, reports accuracy {self.lie}"
        strength = {
            "scaling": f"factor {self.factor}",
            "gaussian": f"std {self.noise_std}",
            "same-value": f"value {self.value}",
            "alie": f"z {'from n and f' if self.z is None else self.z}",
            "ipm": f"epsilon {self.epsilon}",
            "min-max": f"perturbation {self.perturbation}",
            "min-sum": f"perturbation {self.perturbation}",
        }.get(self.kind, "")
        return ", ".join(x for x in (self.kind, strength, f"every {self.every} rounds") if x)

    @property
    def poisons_data(self) -> bool:
        """Whether the attack changes training data rather than the sent model."""
        return self.kind == "label-flip"

    @property
    def colludes(self) -> bool:
        """Whether the attackers craft one delta from their pooled honest ones."""
        return self.kind in COLLUDING

    @property
    def lies(self) -> bool:
        """Whether the attackers report a made-up accuracy instead of their model's."""
        return self.kind == "lying-evaluation"

    @property
    def changes_model(self) -> bool:
        """Whether the attack changes the weights sent (in the rounds it fires)."""
        return not (self.kind == "none" or self.poisons_data or self.lies)

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
    attack_every: int | None = Field(
        None,
        ge=1,
        description="model attacks fire every this many rounds (default: 5 for scaling, "
        "sign-flip, gaussian and same-value, every round for the colluding attacks)",
    )
    attack_z: float | None = Field(
        None, description="alie: z (default: from the round's size and the colluders)"
    )
    attack_epsilon: float = Field(0.1, description="ipm: colluders send -epsilon x their mean")
    attack_perturbation: Annotated[str, choice(PERTURBATIONS)] = Field(
        "std", description="min-max, min-sum: direction from the mean (std, unit, sign)"
    )
    attack_lie: float = Field(
        0.0, ge=0, le=1, description="lying-evaluation: the accuracy attackers report"
    )
    attack_placement: Annotated[str, choice(PLACEMENTS)] = Field(
        "per-group", description="spread attackers over the true groups, or at random"
    )

    def config(self) -> AttackConfig:
        """The attack as the participant applies it."""
        every = self.attack_every
        if every is None:
            every = 1 if self.attack in COLLUDING else LOUD_EVERY
        return AttackConfig(
            self.attack,
            self.attack_factor,
            every,
            z=self.attack_z,
            epsilon=self.attack_epsilon,
            perturbation=self.attack_perturbation,
            lie=self.attack_lie,
        )
