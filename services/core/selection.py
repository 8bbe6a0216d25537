"""Participant selection: fair per-cluster selection (docs/algorithm.md, section 4) and random."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.core.errors import ConfigError


def shares(sizes: Sequence[int], total: int, round_: int = 0) -> list[int]:
    """How many to select from each cluster: as equal as the clusters' sizes allow.

    Water-filling: every cluster gets the same share, a cluster smaller than it gives all
    its members, and what it could not give is shared by the others the same way. The
    last remainder (fewer than the clusters still open) goes one each to clusters that
    rotate with the round, so equal clusters get shares that differ by at most one in a
    round and are equal over every k rounds.

    Departure from the published min(total / k, smallest cluster) from every cluster: one
    cluster of 1 then held every round of a 30-participant federation to k updates (digits,
    Dirichlet(0.3) shards, seed 0: three per round, 0.68 against FedAvg's 0.90). A large
    cluster still cannot crowd out a small one: the small one gives every member it has,
    and the merge weighs clusters, not updates.
    """
    k = len(sizes)
    counts = [0] * k
    remaining = min(total, sum(sizes))
    open_ = [c for c in range(k) if sizes[c] > 0]
    while remaining > 0 and open_:
        share = remaining // len(open_)
        if share == 0:  # the remainder: one each, rotating with the round
            first = (max(round_, 0) * remaining) % len(open_)
            for j in range(remaining):
                counts[open_[(first + j) % len(open_)]] += 1
            break
        for c in open_:
            give = min(share, sizes[c] - counts[c])
            counts[c] += give
            remaining -= give
        open_ = [c for c in open_ if counts[c] < sizes[c]]
    return counts


def fair_select(
    assignment: Sequence[int] | np.ndarray,
    total: int,
    rng: np.random.Generator,
    round_: int = 0,
) -> dict[int, list[int]]:
    """`shares` of `total` from every cluster, uniformly at random inside each.

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
    counts = shares([len(members[c]) for c in clusters], total, round_)
    return {
        c: sorted(int(i) for i in rng.choice(members[c], n, replace=False))
        for c, n in zip(clusters, counts, strict=True)
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
