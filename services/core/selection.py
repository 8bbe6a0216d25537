"""Participant selection: fair per-cluster selection (docs/algorithm.md, section 4) and random."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.core.errors import ConfigError


def fair_select(
    assignment: Sequence[int] | np.ndarray,
    total: int,
    rng: np.random.Generator,
    round_: int = 0,
) -> dict[int, list[int]]:
    """The same number from every cluster, uniformly at random inside each.

    per_cluster = min(total // k, smallest cluster size): a large cluster cannot crowd out a
    small one. The remainder r = total mod k (when no cluster caps the share) goes one each to
    r clusters that rotate with the round: shares differ by at most one in a round and are
    equal over every k rounds, and `--select 100` over 3 clusters selects 100, not 99 (the
    research code gives the remainder to the last cluster, which favours it every round).
    Returns cluster -> sorted participant indices.
    """
    labels = np.asarray(assignment)
    clusters = sorted(int(c) for c in np.unique(labels))
    if not clusters:
        raise ConfigError("no participants to select from")
    k = len(clusters)
    if total < k:
        raise ConfigError(f"selecting {total} participants cannot cover {k} clusters")
    members = {c: np.flatnonzero(labels == c) for c in clusters}
    per = min(total // k, min(len(m) for m in members.values()))
    extra = total - per * k if per == total // k else 0
    first = (max(round_, 0) * extra) % k
    plus = {clusters[(first + j) % k] for j in range(extra)}
    return {
        c: sorted(
            int(i)
            for i in rng.choice(members[c], min(per + (c in plus), len(members[c])), replace=False)
        )
        for c in clusters
    }


def random_select(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """k of n participants uniformly at random (seed 002's client sampling)."""
    if not 0 < k <= n:
        raise ConfigError(f"cannot select {k} of {n} participants")
    return sorted(int(i) for i in rng.choice(n, k, replace=False))


def poisson_rates(sizes: Mapping[int, int], total: int) -> dict[int, float]:
    """Each group's sampling rate when every participant is drawn on its own (differential
    privacy's Poisson sampling): min(1, (total / k) / size), so every group expects the
    same share of `total`, as `fair_select` gives it, and a small group's members are drawn
    more often (the accountant takes the largest rate)."""
    if not sizes:
        raise ConfigError("no participants to select from")
    k = len(sizes)
    return {c: min(1.0, total / k / n) for c, n in sizes.items() if n > 0}


def poisson_select(
    assignment: Sequence[int] | np.ndarray, rates: Mapping[int, float], rng: np.random.Generator
) -> dict[int, list[int]]:
    """Each participant independently with its group's rate: the sampling the accountant's
    amplification holds for (a fixed-size draw per cluster is not Poisson sampling).
    Returns group -> sorted participant indices (groups drawn empty are left out)."""
    labels = np.asarray(assignment)
    draws = rng.random(len(labels))
    out: dict[int, list[int]] = {}
    for i, (c, u) in enumerate(zip(labels.tolist(), draws.tolist(), strict=True)):
        if u < rates.get(int(c), 0.0):
            out.setdefault(int(c), []).append(i)
    return out
