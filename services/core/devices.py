"""Simulated device heterogeneity: how much slower each participant is, and its dropouts.

Real federations run on devices whose speeds differ by 10x or more, and devices go away in
the middle of a task. Simulations (`flclustering simulate` and `local`) reproduce both:

- participant i's *slowness factor* is drawn log-uniformly from [1, spread]: its log is
  uniform, so as many devices are 2-4x slower as 4-8x, and the slowest and fastest span
  up to `spread` (10: a tenfold spread). A participant whose training took t seconds of
  compute waits (factor - 1) x t more before it uploads, so its update arrives after
  factor x t, a real delay the clocks of every service see;
- each task is dropped with probability `dropout`: the participant trains and never
  uploads, as a phone that lost its network does.

The draws are seeded from the federation's seed and nothing else, so the simulate and
local runs of one experiment give every participant the same factor, and a restarted
participant process the same one.
"""

from __future__ import annotations

import numpy as np

from services.core.errors import ConfigError

STREAM = 0xDE71CE  # the seed stream of device draws (independent of the partitions')


def speed_factors(participants: int, spread: float, seed: int) -> np.ndarray:
    """Each participant's slowness factor in [1, spread], log-uniform, seeded."""
    if participants < 0:
        raise ConfigError(f"participants must be non-negative, got {participants}")
    if not spread >= 1:
        raise ConfigError(f"the speed spread must be at least 1, got {spread}")
    if spread == 1:
        return np.ones(participants)
    rng = np.random.default_rng([seed, STREAM])
    return np.exp(rng.uniform(0.0, np.log(spread), participants))


def drops(participant: int, task: int, dropout: float, seed: int) -> bool:
    """Whether `participant` drops its `task`-th training task (seeded per participant and
    task, so it does not depend on the order in which tasks arrive)."""
    if not 0 <= dropout < 1:
        raise ConfigError(f"the dropout probability must lie in [0, 1), got {dropout}")
    if dropout == 0:
        return False
    rng = np.random.default_rng([seed, STREAM, participant, task])
    return bool(rng.random() < dropout)
