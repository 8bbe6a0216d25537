"""Simulated attacks, for evaluating robustness only (ALGORITHM.md section 8).

Each is a pure function over tensors; the participant applies one when `--attack` says so and
logs loudly that it is doing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from services.common.errors import ConfigError
from services.common.registry import Registry
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


def scale(weights: torch.Tensor, factor: float) -> torch.Tensor:
    """Scaling (model) attack: send the weights times a factor (-1 negates the model)."""
    return weights * factor


def flip_labels(y: torch.Tensor, source: int = 0, target: int = 9) -> torch.Tensor:
    """Label-flipping (data) attack: relabel class `source` as `target`."""
    out = y.clone()
    out[y == source] = target
    return out


def sign_flip(weights: torch.Tensor, reference: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Send the reference minus the honest update (times factor): the update's sign flipped."""
    return reference - factor * (weights - reference)


def gaussian(weights: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Replace the weights by weights plus Gaussian noise of the given standard deviation."""
    noise = torch.randn(weights.shape, generator=generator, dtype=weights.dtype)
    return weights + std * noise.to(weights.device)


def same_value(weights: torch.Tensor, value: float) -> torch.Tensor:
    """Same-value attack: every weight set to one constant."""
    return torch.full_like(weights, value)


# Model attacks by name; each takes (config, weights, reference, generator).
MODEL_ATTACKS: Registry[
    Callable[[AttackConfig, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
] = Registry(
    "model attack",
    {
        "scaling": lambda c, w, ref, gen: scale(w, c.factor),
        "sign-flip": lambda c, w, ref, gen: sign_flip(w, ref),
        "gaussian": lambda c, w, ref, gen: gaussian(w, c.noise_std, gen),
        "same-value": lambda c, w, ref, gen: same_value(w, c.value),
    },
)
assert set(ATTACKS) == {"none", "label-flip", *MODEL_ATTACKS}


def apply_model_attack(
    config: AttackConfig,
    weights: torch.Tensor,
    reference: torch.Tensor,
    round_: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The flat weights an attacker sends in this round (unchanged when it does not fire)."""
    if config.poisons_data or not config.fires(round_):
        return weights
    return MODEL_ATTACKS[config.kind](config, weights, reference, generator)


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
