"""Fair per-cluster selection and random selection."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.errors import ConfigError
from services.core.plan import evaluation_sample
from services.core.selection import fair_select, random_select, shares


def test_fair_select_takes_equal_shares():
    labels = np.array([0] * 20 + [1] * 3 + [2] * 7)
    picked = fair_select(labels, 12, np.random.default_rng(0))
    # 4 each, but cluster 1 has 3: its fourth is shared by the others (the remainder in
    # rotation), not dropped from the round.
    assert {c: len(v) for c, v in picked.items()} == {0: 5, 1: 3, 2: 4}
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


def test_fair_select_hands_out_the_remainder_in_rotation():
    labels = np.repeat([0, 1, 2], 50)
    rng = np.random.default_rng(3)
    totals = np.zeros(3, int)
    for r in range(3):
        picked = fair_select(labels, 100, rng, r)
        sizes = [len(picked[c]) for c in range(3)]
        assert sum(sizes) == 100 and max(sizes) - min(sizes) == 1
        totals += sizes
    assert totals.tolist() == [100, 100, 100]  # equal over k rounds
    # A small cluster gives all it has, and the others take what it could not give.
    capped = fair_select(np.array([0] * 20 + [1] * 3), 10, rng, 1)
    assert {c: len(v) for c, v in capped.items()} == {0: 7, 1: 3}


def test_a_cluster_of_one_does_not_throttle_the_round():
    # Ward on Dirichlet shards made clusters of 18, 11 and 1: the round still selects 15.
    labels = np.array([0] * 18 + [1] * 11 + [2])
    for r in range(4):
        counts = {
            c: len(v) for c, v in fair_select(labels, 15, np.random.default_rng(r), r).items()
        }
        assert counts[2] == 1 and sum(counts.values()) == 15
        assert abs(counts[0] - counts[1]) <= 1
    assert shares([2, 2], 10) == [2, 2]  # never more than there are
    assert shares([5, 0, 5], 4, 1) == [2, 0, 2]


def test_evaluation_sample_is_everyone_up_to_the_limit_then_a_stratified_sample():
    groups = {f"p{i:05d}": (0 if i < 9000 else 1) for i in range(10_000)}
    assert evaluation_sample(groups, 0, 0, 3) == sorted(groups)
    assert evaluation_sample(dict(list(groups.items())[:50]), 1000, 0, 3) == sorted(groups)[:50]
    sample = evaluation_sample(groups, 1000, 0, 3)
    assert len(sample) == 1000 and len(set(sample)) == 1000
    assert sum(groups[p] == 1 for p in sample) == 100  # in proportion to the group's size
    assert sample == evaluation_sample(groups, 1000, 0, 3)  # a restart asks the same
    assert sample != evaluation_sample(groups, 1000, 0, 4)  # another round, another sample
    tiny = {**groups, "zz-alone": 2}
    assert "zz-alone" in evaluation_sample(tiny, 1000, 0, 3)  # every group is heard
