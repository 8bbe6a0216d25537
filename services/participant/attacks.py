"""Simulated attacks, for evaluating robustness only (docs/algorithm.md, section 8).

Each is a pure function over tensors; the participant applies one when `--attack` says so and
logs loudly that it is doing it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.core.registry import Registry
from services.participant.adversary import (
    ATTACKS,
    COLLUDING,
    FORGING,
    PLACEMENTS,
    AttackConfig,
    AttackSettings,
    choose_attackers,
)

__all__ = [
    "ATTACKS",
    "PLACEMENTS",
    "AttackConfig",
    "AttackSettings",
    "apply_model_attack",
    "choose_attackers",
    "flip_labels",
]


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
assert set(ATTACKS) == {
    "none",
    "label-flip",
    "lying-evaluation",
    "backdoor",
    *COLLUDING,
    *MODEL_ATTACKS,
    *FORGING,
}


def apply_model_attack(
    config: AttackConfig,
    weights: torch.Tensor,
    reference: torch.Tensor,
    round_: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The flat weights an attacker sends in this round (unchanged when it does not fire).

    Colluding attacks need the other colluders' updates: `collusion.craft` makes theirs;
    the backdoor's boost needs the round's size: `backdoor.replacement`."""
    if config.kind not in MODEL_ATTACKS or not config.fires(round_):
        return weights
    return MODEL_ATTACKS[config.kind](config, weights, reference, generator)
