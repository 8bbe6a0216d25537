"""Simulated attacks, for evaluating robustness only (ALGORITHM.md section 8).

Each is a pure function over tensors; the participant applies one when `--attack` says so and
logs loudly that it is doing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.errors import ConfigError

ATTACKS = ("none", "scaling", "label-flip", "sign-flip", "gaussian", "same-value")


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
    if config.kind == "scaling":
        return scale(weights, config.factor)
    if config.kind == "sign-flip":
        return sign_flip(weights, reference)
    if config.kind == "gaussian":
        return gaussian(weights, config.noise_std, generator)
    return same_value(weights, config.value)
