"""The divergence guard: whether a merged model may become the next version.

A merge is refused when its result holds a non-finite value, when its largest weight grew
more than GROWTH-fold over the model it started from (and past GROWTH: the rule every
participant applies before it adopts a model, services/core/sanity.py), or when its step
`||w_{t+1} - w_t||` is more than STEP_FACTOR times the median of the last accepted steps
(once MIN_STEPS of them are known). The version stays what it was and the round ends with
the reason; the evaluations of the participants are the second line (a model within these
bounds whose accuracy collapses is rolled back by the clusterer).

Why these thresholds (benchmarks/guard.py --no-guard, honest runs of 30 rounds on digits
with practical-noniid, Dirichlet(0.3), iid and rotated groups, flclustering and FedAvg,
seeds 1-3): the largest weight never grew more than 1.46-fold in a round, and the largest
step was 7.3 times the median of the five before it (FedAvg, practical-noniid, seed 1:
0.074 then 1.078 in round 20, when the selection changed). Honest steps jump by that much,
so the step bound sits far above it (50x) and catches only what is out of all proportion;
a merge that overflows grows by orders of magnitude more. What passes both: a model that
drifts a few per cent a round, or one that is finite, in proportion and wrong; the
evaluations catch those only when they collapse or turn non-finite.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.core.sanity import largest, unfit

STEP_FACTOR = 50.0  # a step past this times the median of the recent ones is refused
STEPS_KEPT = 5  # accepted steps the median is taken over
MIN_STEPS = 3  # below this many known steps the step rule does not apply


@dataclass(frozen=True)
class MergeCheck:
    """The guard's verdict on one merge: why it is refused ("" when it is not), its step."""

    refused: str
    step: float


def check_merge(
    base: torch.Tensor, new: torch.Tensor, recent: Sequence[float], bounds: bool = True
) -> MergeCheck:
    """Whether the flat model `new`, merged from `base`, may become the next version, given
    the lengths of the last accepted steps (oldest first). Without `bounds` (--guard
    false) only a non-finite merge is refused."""
    if not bool(torch.isfinite(new).all()):
        return MergeCheck("the merged model holds non-finite values", math.inf)
    step = float((new.double() - base.double()).norm())
    if not bounds:
        return MergeCheck("", step)
    grown = unfit({"the merged model": new}, largest({"": base}))  # the participants' rule
    if grown is not None:
        return MergeCheck(f"the merged model: {grown}", step)
    steps = list(recent)[-STEPS_KEPT:]
    if len(steps) >= MIN_STEPS:
        typical = statistics.median(steps)
        if typical > 0 and step > STEP_FACTOR * typical:
            return MergeCheck(
                f"the merge moves the model by {step:.3g}, {step / typical:.1f} times the "
                f"median of the last {len(steps)} steps ({typical:.3g}; at most "
                f"{STEP_FACTOR:g} times)",
                step,
            )
    return MergeCheck("", step)


def remember(steps: Sequence[float], step: float) -> list[float]:
    """The recent steps after an accepted one (the last STEPS_KEPT)."""
    return [*steps, step][-STEPS_KEPT:]
