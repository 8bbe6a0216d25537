"""Fair per-cluster selection and random selection."""

from __future__ import annotations

import numpy as np
import pytest

from services.clusterer.selection import fair_select, random_select
from services.common.errors import ConfigError


def test_fair_select_takes_equal_shares():
    labels = np.array([0] * 20 + [1] * 3 + [2] * 7)
    picked = fair_select(labels, 12, np.random.default_rng(0))
    assert {c: len(v) for c, v in picked.items()} == {0: 3, 1: 3, 2: 3}  # min(12 // 3, 3)
    for c, members in picked.items():
        assert all(labels[i] == c for i in members)
        assert len(set(members)) == len(members)


def test_fair_select_is_uniform_inside_clusters():
    labels = np.array([0] * 10 + [1] * 10)
    rng = np.random.default_rng(1)
    counts = np.zeros(20)
    for _ in range(2000):
        for members in fair_select(labels, 4, rng).values():
            counts[members] += 1
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_fair_select_deterministic_from_seed():
    labels = np.repeat([0, 1, 2], 10)
    a = fair_select(labels, 15, np.random.default_rng(5))
    b = fair_select(labels, 15, np.random.default_rng(5))
    assert a == b


def test_random_select():
    chosen = random_select(10, 4, np.random.default_rng(0))
    assert len(set(chosen)) == 4 and all(0 <= i < 10 for i in chosen)
    with pytest.raises(ConfigError):
        random_select(3, 4, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        fair_select([0, 1, 2], 2, np.random.default_rng(0))
