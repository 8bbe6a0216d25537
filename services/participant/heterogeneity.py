"""A simulated participant's device: slower than the fastest by its factor, and now and
then losing the work of a training task (`--speed-spread`, `--dropout`; the draws are
services/core/devices.py's, so simulate and local give every participant the same factor,
and the same draw for its n-th TRAIN task).

Only TRAIN tasks are slowed and dropped: pre-training (once, before clustering) and
evaluation tasks run at the process's own speed and always answer, so that clustering and
the figures of a run do not wait on the simulated devices.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from services.common.settings import DevicesSettings
from services.core.devices import drops, speed_factors


@dataclass(frozen=True)
class SimulatedDevice:
    """Participant `index`'s device: its slowness factor and its dropout draws."""

    index: int = 0
    factor: float = 1.0  # >= 1: an update arrives after factor x the training's compute
    dropout: float = 0.0  # probability that a TRAIN task's work is lost
    seed: int = 0  # the federation's seed: the dropout draws are seeded by it

    @property
    def heterogeneous(self) -> bool:
        """Whether this device differs from the process's own (slower, or dropping)."""
        return self.factor != 1.0 or self.dropout > 0

    def delay_s(self, compute_s: float) -> float:
        """How long it waits after compute_s of training: (factor - 1) x compute_s."""
        return (self.factor - 1.0) * max(compute_s, 0.0)

    def loses(self, task: int) -> bool:
        """Whether it loses the work of its `task`-th TRAIN task (0-based, counting the
        TRAIN tasks it trained)."""
        return drops(self.index, task, self.dropout, self.seed)

    def wait(self, compute_s: float, stop: threading.Event) -> bool:
        """After compute_s of training, wait as the slower device would: (factor - 1) x
        compute_s more, cut short by `stop`; whether it waited it all (False: stopping). A
        device as fast as the process waits nothing and goes on even when stopping, as a
        participant without simulated devices tries to deliver what it trained."""
        delay = self.delay_s(compute_s)
        return delay <= 0 or not stop.wait(delay)


def simulated_devices(
    hosted: range, participants: int, devices: DevicesSettings, seed: int
) -> list[SimulatedDevice]:
    """The devices of the hosted participants (global indices), drawn from the whole
    federation's factors, so that a participant's factor does not depend on the process
    that hosts it."""
    factors = speed_factors(participants, devices.speed_spread, seed)
    return [SimulatedDevice(i, float(factors[i]), devices.dropout, seed) for i in hosted]
