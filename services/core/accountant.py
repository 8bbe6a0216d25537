"""The privacy accountant: epsilon spent by a sequence of Poisson-sampled Gaussian steps.

Both kinds of differential privacy here are compositions of the sampled Gaussian
mechanism: central DP one step per round (a participant sampled with its cluster's rate,
noise multiplier z on the merge), DP-SGD one step per mini-batch (an example sampled with
rate batch/examples). The Renyi-DP bound of each step is Opacus's implementation of
Mironov, Talwar and Zhang (2019), maintained with Opacus and used by its PrivacyEngine;
tests/unit/test_accountant.py checks it against Google's dp-accounting (its RDP and PLD
accountants, written independently). RDP composes by addition, and the conversion to
(epsilon, delta) is Opacus's (Balle et al. 2020's tighter conversion).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.core.errors import ConfigError

# Opacus's orders: fractional ones near 1 for few steps, integers up to 63 for many.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

# Opacus logs a warning for every order its series does not converge for (those orders
# are then left out of the minimum, which only makes epsilon larger): not for an operator.
logging.getLogger("opacus.accountants.analysis.rdp").setLevel(logging.ERROR)
logging.getLogger("opacus").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Step:
    """`count` compositions of the sampled Gaussian with multiplier `noise` and `rate`."""

    noise: float
    rate: float
    count: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise) and self.noise > 0):
            raise ConfigError(f"a noise multiplier must be positive, got {self.noise}")
        if not 0 < self.rate <= 1:
            raise ConfigError(f"a sampling rate must lie in (0, 1], got {self.rate}")
        if self.count < 0:
            raise ConfigError(f"a step count cannot be negative, got {self.count}")


def epsilon_of(steps: Iterable[Step], delta: float) -> float:
    """Epsilon at `delta` after the steps (0 for none)."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta}")
    total = [0.0] * len(ORDERS)
    merged: dict[tuple[float, float], int] = {}
    for s in steps:
        merged[(s.noise, s.rate)] = merged.get((s.noise, s.rate), 0) + s.count
    if not any(merged.values()):
        return 0.0
    # Imported when first needed: Opacus takes seconds to import, and a run without DP (or a
    # process that only reads its flags) never needs it.
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    for (noise, rate), count in merged.items():
        if count:
            rdp = compute_rdp(q=rate, noise_multiplier=noise, steps=count, orders=list(ORDERS))
            total = [a + float(b) for a, b in zip(total, rdp, strict=True)]
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


@dataclass
class Ledger:
    """What a party has spent: its steps so far, epsilon at `delta`, and its budget.

    Kept in the state of whoever runs the mechanism (the clusterer for central DP, each
    participant for DP-SGD) and written with it, so a restart resumes the sum.
    """

    delta: float
    budget: float | None = None
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ConfigError(f"an epsilon budget must be positive, got {self.budget}")

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far."""
        return epsilon_of(self.steps, self.delta)

    def after(self, more: Sequence[Step]) -> float:
        """Epsilon once `more` steps are spent too."""
        return epsilon_of([*self.steps, *more], self.delta)

    def refuses(self, more: Sequence[Step]) -> str:
        """Why `more` would break the budget ("" when it would not, or there is none)."""
        if self.budget is None:
            return ""
        next_eps = self.after(more)
        if next_eps <= self.budget:
            return ""
        return (
            f"the privacy budget is spent: the next round would bring epsilon to "
            f"{next_eps:.3g} at delta {self.delta:g}, over --dp-epsilon {self.budget:g} "
            f"(spent {self.epsilon:.3g})"
        )

    def spend(self, more: Sequence[Step]) -> None:
        """Record steps that ran."""
        self.steps.extend(more)

    def to_json(self) -> dict[str, object]:
        """The ledger as JSON (each step as recorded)."""
        return {
            "delta": self.delta,
            "budget": self.budget,
            "steps": [[s.noise, s.rate, s.count] for s in self.steps],
        }

    @staticmethod
    def from_json(data: dict[str, object]) -> Ledger:
        """A ledger read back from state (values checked as new ones are)."""
        steps = data.get("steps", [])
        if not isinstance(steps, list):
            raise ConfigError("a privacy ledger's steps must be a list")
        budget = data.get("budget")
        return Ledger(
            float(data["delta"]),  # type: ignore[arg-type]
            None if budget is None else float(budget),  # type: ignore[arg-type]
            [Step(float(n), float(r), int(c)) for n, r, c in steps],
        )
