"""Figures a round is judged by: accuracy across participants, and clustering purity."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class AccuracySummary:
    """Mean, standard deviation (the fairness figure), worst decile and worst accuracy."""

    mean: float
    std: float
    worst_decile: float  # mean accuracy of the worst 10% of participants (at least one)
    worst: float


def accuracy_summary(accuracies: Sequence[float] | np.ndarray) -> AccuracySummary:
    """Summarise per-participant accuracies (population standard deviation)."""
    a = np.asarray(accuracies, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no accuracies to summarise")
    tail = max(1, int(np.ceil(0.1 * a.size)))
    return AccuracySummary(
        float(a.mean()), float(a.std()), float(np.sort(a)[:tail].mean()), float(a.min())
    )


def group_means(accuracies: Mapping[K, float], groups: Mapping[K, int]) -> dict[int, float]:
    """Mean accuracy per ground-truth group (participants without one, -1, left out)."""
    by: dict[int, list[float]] = {}
    for p, a in accuracies.items():
        g = groups.get(p, -1)
        if g >= 0:
            by.setdefault(int(g), []).append(float(a))
    return {g: float(np.mean(v)) for g, v in sorted(by.items())}


def purity(assignment: Sequence[int] | np.ndarray, truth: Sequence[int] | np.ndarray) -> float:
    """Share of participants whose cluster's majority ground-truth group is their own."""
    pred = np.asarray(assignment)
    true = np.asarray(truth)
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError("assignment and truth must be non-empty and of equal length")
    total = 0
    for c in np.unique(pred):
        _, counts = np.unique(true[pred == c], return_counts=True)
        total += int(counts.max())
    return total / pred.size


# The defence's layers an update can be rejected by (a robust rule's own reason is its name).
LAYERS = ("non-finite", "norm", "near-twin", "robust-rule")


def rejection_layer(reason: str) -> str:
    """The layer of a rejection reason: a bounded set (metric labels, figures)."""
    return reason if reason in LAYERS[:3] else "robust-rule"


def rejections_by_layer(reasons: Iterable[str]) -> dict[str, int]:
    """How many updates each layer rejected (every layer present, zeros included)."""
    counts = dict.fromkeys(LAYERS, 0)
    for reason in reasons:
        counts[rejection_layer(reason)] += 1
    return counts
