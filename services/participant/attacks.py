"""Simulated attacks, for evaluating robustness only (docs/algorithm.md, section 8).

An attack is an `Attack`: hooks the participant (services/participant/worker.py) and the
in-process federation (services/local.py) call at the same points of a round, each with a
`View` of what the attacker knows. Default hooks do nothing; an attack overrides those it
needs. Attacks are registered by name in `services.participant.adversary.ATTACKS` (torch-free:
the settings read the --attack choices from it) and built here by `build_attack`.

The hooks, in the order a round calls them:

- `on_pretrain`: the pre-training delta clustering groups (cluster steering); colluders that
  set `pools_pretrain` get their pooled deltas.
- `on_data`: the training data (data poisoning: label flip, backdoor).
- `on_update`: the trained weights one attacker sends, against the model it trained from
  (scaling, sign-flip, gaussian, same-value, the backdoor's boost), in the rounds
  `crafts_update` says.
- `on_pooled`: the delta a colluder sends, from the colluders' pooled honest deltas (ALIE,
  IPM, Min-Max, Min-Sum, cluster steering), for attacks that set `pools_update`.
- `on_encrypt`: the ciphertexts sent under --secure he (forged updates; services only).
- `on_report`: the evaluation figures reported (lying evaluation).

Draws come from `View.generator`, the attacker's own stream, in the order above: the
services and `flclustering local` then draw alike.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from services.participant.adversary import (
    ATTACKS,
    PLACEMENTS,
    AttackConfig,
    AttackSettings,
    choose_attackers,
)

if TYPE_CHECKING:
    from services.common.homomorphic import HeKeys
    from services.core.defence import DefenceConfig

__all__ = [
    "ATTACKS",
    "PLACEMENTS",
    "Attack",
    "AttackConfig",
    "AttackSettings",
    "View",
    "build_attack",
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


@dataclass(frozen=True)
class View:
    """What an attacker knows when a hook runs."""

    round: int  # the round (-1: pre-training)
    size: int  # participants per round, as the attacker assumes it (colluders, backdoor)
    generator: torch.Generator  # the attacker's own stream: every draw comes from it
    who: str | None = None  # the participant, named in its log lines (None: silent)
    logger: logging.Logger | None = None  # where they go
    # What omniscient colluders know besides (--attack-knowledge omniscient, `flclustering
    # local` only; the services pass none of it): which rows of the pooled deltas are the
    # colluders' own (None: all of them), each pooled row's cluster, and the round's defence.
    mine: tuple[bool, ...] | None = None
    clusters: tuple[int, ...] | None = None
    defence: DefenceConfig | None = None

    def colluders(self, pooled: torch.Tensor) -> torch.Tensor:
        """The colluders' own rows of the pooled deltas (all of them unless `mine`)."""
        if self.mine is None:
            return pooled
        return pooled[torch.tensor(self.mine, dtype=torch.bool, device=pooled.device)]

    def say(self, message: str, *args: object) -> None:
        """Log loudly that a simulated attack acts ("SIMULATED ATTACK: <who> <message>")."""
        if self.who is not None:
            log = self.logger or logging.getLogger(__name__)
            log.warning("SIMULATED ATTACK: %s " + message, self.who, *args)


class Attack:
    """An attack's hooks; each default does nothing (an honest participant's `NoAttack`).

    One instance per attacker (it may keep state, as a forger its own key); `config` holds
    the strengths the settings gave.
    """

    # Colluders pool their pre-training deltas; `on_pretrain` then gets the pool.
    pools_pretrain: ClassVar[bool] = False
    # Colluders pool their honest training deltas and send `on_pooled`'s delta.
    pools_update: ClassVar[bool] = False

    def __init__(self, config: AttackConfig) -> None:
        self.config = config
        self.kind = config.kind

    # ---- what it is ------------------------------------------------------------------
    @property
    def needs_services(self) -> str:
        """Why only the services can simulate it (`flclustering local` refuses it), or ""."""
        return ATTACKS[self.kind].needs_services

    def fires(self, round_: int) -> bool:
        """Whether it fires in this round (--attack-every; data attacks always)."""
        return self.config.fires(round_)

    def crafts_update(self, round_: int) -> bool:
        """Whether `on_update` (or, colluding, `on_pooled`) makes this round's upload."""
        return False

    STRENGTH = ""  # its settings for the attacker's log line, `c` being its config

    def strength(self) -> str:
        """Its settings, for the attacker's log line ("" when none)."""
        return self.STRENGTH.format(c=self.config)

    def periodic(self) -> bool:
        """Whether the log line names its period (--attack-every)."""
        return True

    def describe(self) -> str:
        """The attack and the settings it uses, for the attacker's log line."""
        jitter = f"jitter {self.config.jitter}" if self.pools_update and self.config.jitter else ""
        fit = "fitted to the defence" if self.pools_update and self.config.fit else ""
        every = f"every {self.config.every} rounds" if self.periodic() else ""
        return ", ".join(x for x in (self.kind, self.strength(), jitter, fit, every) if x)

    # ---- the hooks -------------------------------------------------------------------
    def on_pretrain(
        self, delta: torch.Tensor, view: View, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The pre-training delta sent; `pooled`: the colluders' (k, d) ones when
        `pools_pretrain`, this one's among them (omniscient: every participant's, the
        colluders' rows marked by `view.mine`)."""
        return delta

    def on_data(
        self, x: torch.Tensor, y: torch.Tensor, view: View
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training data it trains on."""
        return x, y

    def on_update(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        """The flat weights it sends, from its trained ones and the model it trained from
        (called in the rounds `crafts_update` says)."""
        return weights

    def on_pooled(self, pooled: torch.Tensor, view: View) -> torch.Tensor:
        """The delta a colluder sends, from the colluders' (k, d) honest deltas (omniscient:
        every participant's of the round, the colluders' marked by `view.mine`; called in
        the rounds `crafts_update` says, when `pools_update`)."""
        raise NotImplementedError(f"{self.kind} does not collude")

    def on_encrypt(self, he: HeKeys, flat: torch.Tensor, n: int, view: View) -> list[bytes] | None:
        """Ciphertexts to send instead of n * flat encrypted honestly (None: honest)."""
        return None

    def on_report(self, figures: dict[str, float], view: View) -> dict[str, float]:
        """The evaluation figures it reports (accuracy, loss, personal_*)."""
        return figures


def build_attack(config: AttackConfig) -> Attack:
    """The registered attack of `config.kind`, its class imported on first use."""
    module, _, name = ATTACKS[config.kind].factory.partition(":")
    cls = getattr(importlib.import_module(module), name)
    attack = cls(config)
    if not isinstance(attack, Attack):
        raise TypeError(f"attack {config.kind!r}: {ATTACKS[config.kind].factory} is no Attack")
    return attack


class NoAttack(Attack):
    """An honest participant."""


class _ModelAttack(Attack):
    """A loud model attack: the weights sent replaced in the rounds it fires."""

    def crafts_update(self, round_: int) -> bool:
        return self.fires(round_)

    def craft(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        raise NotImplementedError

    def on_update(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        sent = self.craft(weights, base, view)
        view.say("sends %s weights in round %d", self.kind, view.round)
        return sent


class Scaling(_ModelAttack):
    """The weights times --attack-factor (the research code sends -w)."""

    STRENGTH = "factor {c.factor}"

    def craft(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        return scale(weights, self.config.factor)


class SignFlip(_ModelAttack):
    """The model it trained from minus its honest update."""

    def craft(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        return sign_flip(weights, base)


class Gaussian(_ModelAttack):
    """The weights plus Gaussian noise of --attack-noise-std (drawn from its stream)."""

    STRENGTH = "std {c.noise_std}"

    def craft(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        return gaussian(weights, self.config.noise_std, view.generator)


class SameValue(_ModelAttack):
    """Every weight set to one constant."""

    STRENGTH = "value {c.value}"

    def craft(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        return same_value(weights, self.config.value)


class LabelFlip(Attack):
    """A data attack: class flip_from relabelled as flip_to, every round."""

    STRENGTH = "class {c.flip_from} as {c.flip_to}"

    def periodic(self) -> bool:
        return False

    def on_data(
        self, x: torch.Tensor, y: torch.Tensor, view: View
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view.say("trains on flipped labels")
        return x, flip_labels(y, self.config.flip_from, self.config.flip_to)


def lie(attack: Attack, figures: dict[str, float], view: View) -> dict[str, float]:
    """The figures with every accuracy replaced by --attack-lie (losses kept)."""
    view.say("reports accuracy %s", attack.config.lie)
    return {k: attack.config.lie if "accuracy" in k else v for k, v in figures.items()}


class LyingEvaluation(Attack):
    """Reports a made-up accuracy instead of its model's."""

    STRENGTH = "reports accuracy {c.lie}"

    def periodic(self) -> bool:
        return False

    def on_report(self, figures: dict[str, float], view: View) -> dict[str, float]:
        return lie(self, figures, view)
