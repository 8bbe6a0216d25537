"""The virtual clock of a simulated federation: how long each device's tasks take.

`flclustering local` trains every participant for real in one process, one after the
other, so the wall clock says nothing about how a federation of unequal devices paces
itself. The virtual clock does: participant i's task of s SGD steps takes

    factor_i x s x c  seconds,

with factor_i its slowness (`devices.speed_factors`) and c this machine's measured compute
seconds per step: the median over the first wave of tasks, each timed with perf_counter
around its training, then fixed. Why not each task's own measurement: the order in which
updates arrive decides which are merged, and timings of a shared CPU are noisy (another
process, the first call's warm-up). A task's steps are known before it runs, so the order
is a function of the seed alone and the measurement only sets the clock's scale. The
simulation runs in *units* (factor x steps) and converts to seconds when it records.

Pure bookkeeping, torch-free: the in-process synchronous and asynchronous loops share it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any, TypeVar

import numpy as np

from services.core.devices import drops, speed_factors
from services.core.errors import ConfigError

P = TypeVar("P", bound=Hashable)


def over_selected(select: int, over: float) -> int:
    """Participants a synchronous round selects to close at its first `select` updates:
    ceil(select x (1 + over)), rounded first so that 15 x 1.2 is 18, not 19."""
    if select < 0 or not over >= 0:
        raise ConfigError(f"cannot over-select {over} of {select}")
    return math.ceil(round(select * (1.0 + over), 9))


def first_arrivals(finish: Mapping[P, float], wanted: int) -> list[P]:
    """The `wanted` participants whose updates arrive first (ties: the lower id), in id
    order: what a round that closes at `wanted` updates aggregates."""
    order = sorted(finish, key=lambda p: (finish[p], p))
    return sorted(order[: max(0, wanted)])  # type: ignore[type-var]


class VirtualClock:
    """Each participant's slowness and dropped tasks (seeded), and the seconds per step
    that turn the simulation's units into seconds."""

    def __init__(self, participants: int, spread: float, dropout: float, seed: int) -> None:
        self.factors = speed_factors(participants, spread, seed)
        self.spread = spread
        self.dropout = dropout
        self.seed = seed
        self.tasks = [0] * participants  # tasks given to each participant so far
        self._rates: list[float] = []  # measured seconds per step of each task
        self.calibrated = False

    def drops(self, participant: int) -> bool:
        """Whether the participant drops the task it is given now (counted as given)."""
        task = self.tasks[participant]
        self.tasks[participant] += 1
        return drops(participant, task, self.dropout, self.seed)

    def units(self, participant: int, steps: int) -> float:
        """How long a task of `steps` takes the participant, in units (factor x steps)."""
        return float(self.factors[participant]) * steps

    def measure(self, seconds: float, steps: int) -> None:
        """One task's measured compute seconds, until the clock is calibrated."""
        if not self.calibrated and steps > 0:
            self._rates.append(seconds / steps)

    def calibrate(self) -> None:
        """Fix the seconds per step from the tasks measured so far (none: not yet)."""
        self.calibrated = self.calibrated or bool(self._rates)

    @property
    def seconds_per_step(self) -> float:
        """This machine's measured compute seconds per SGD step: the median task's (0
        before any task)."""
        return float(np.median(self._rates)) if self._rates else 0.0

    def seconds(self, units: float) -> float:
        """Units as virtual seconds."""
        return units * self.seconds_per_step

    def summary(self, mode: str, steps: Mapping[int, int]) -> dict[str, Any]:
        """results.json's devices block: the draws, the calibration, and each
        participant's factor and virtual seconds of one task of `steps`."""
        return {
            "mode": mode,
            "speed_spread": self.spread,
            "dropout": self.dropout,
            "seconds_per_step": self.seconds_per_step,
            "factors": {str(i): round(float(f), 3) for i, f in enumerate(self.factors)},
            "task_s": {
                str(i): round(self.seconds(self.units(i, n)), 4) for i, n in sorted(steps.items())
            },
        }
