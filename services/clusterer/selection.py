"""Participant selection: fair per-cluster selection (ALGORITHM.md section 4) and random."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.common.errors import ConfigError


def fair_select(
    assignment: Sequence[int] | np.ndarray, total: int, rng: np.random.Generator
) -> dict[int, list[int]]:
    """The same number from every cluster, uniformly at random inside each.

    per_cluster = min(total // k, smallest cluster size): a large cluster cannot crowd out a
    small one. The remainder of `total` is not handed out (the research code gives it to the
    last cluster, which breaks the equal share). Returns cluster -> sorted participant indices.
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
    return {c: sorted(int(i) for i in rng.choice(members[c], per, replace=False)) for c in clusters}


def random_select(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """k of n participants uniformly at random (seed 002's client sampling)."""
    if not 0 < k <= n:
        raise ConfigError(f"cannot select {k} of {n} participants")
    return sorted(int(i) for i in rng.choice(n, k, replace=False))
