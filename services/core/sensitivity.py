"""How far one participant can move its cluster's aggregate under central DP, per rule
(the derivation is in core/privacy.py and docs/privacy.md). Free of torch: the settings
check which strategies are covered without loading it."""

from __future__ import annotations

import math

from services.core.errors import ConfigError

SPREAD_ANY = 2.0 * math.sqrt(2.0)  # output moved by one participant, in units of C
MEAN_RULES = frozenset({"fedavg"})  # rules that become the fixed-denominator clipped mean
# Bounded by SPREAD_ANY: their output lies in the ball of radius sqrt(2) C around 0 (a
# convex combination of clipped rows, centred clipping's included: each of its steps keeps
# the coefficients non-negative and summing to 1; or a median).
SELECTING_RULES = frozenset({"krum", "multi-krum", "median", "centred-clipping"})
PRIVATE_RULES = MEAN_RULES | SELECTING_RULES


def spread(rule: str, expected: float) -> float:
    """How far one participant can move its cluster's aggregate, in units of C."""
    if rule in MEAN_RULES:
        if expected <= 0:
            raise ConfigError(f"a cluster's expected sampled count must be positive: {expected}")
        return 1.0 / expected
    if rule in SELECTING_RULES:
        return SPREAD_ANY
    raise ConfigError(
        f"central differential privacy has no bounded sensitivity for rule {rule!r}: use "
        f"one of {', '.join(sorted(PRIVATE_RULES))}"
    )
