"""The defence's changes for heterogeneous data: centred clipping (weighted by capped sample
counts), clusters no smaller than the rule's minimum, nearest-neighbour mixing."""

from __future__ import annotations

import numpy as np
import torch

from services.core.clustering import MinCluster, cluster, defensible, group_deltas
from services.core.defence import DefenceConfig, defend
from services.core.distances import gram_of
from services.core.robust import (
    COUNT_CAP,
    RULES,
    centred_clipping_select,
    mixed_select,
    nnm_mixing,
    rule_minimum,
)


def _honest(n: int, d: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.ones(d) + 0.1 * torch.randn(n, d, generator=g)


def test_centred_clipping_keeps_every_row_and_bounds_a_far_one() -> None:
    x = _honest(9)
    far = torch.cat([x, 1000.0 * torch.ones(1, x.shape[1])])
    sel = centred_clipping_select(gram_of(far), 2)
    assert sel.rule == "centred-clipping" and sel.rejected == ()
    assert sel.coefficients is not None
    assert abs(float(sel.coefficients.sum()) - 1.0) < 1e-5  # an affine combination
    out = sel.apply(far)
    # The far row is clipped to the median distance: the aggregate stays by the honest mean,
    # where the mean of the rows moves by 100 per coordinate.
    assert float((out - x.mean(0)).norm()) < 0.5 * float(x.std(0).norm())
    assert float((far.mean(0) - x.mean(0)).abs().min()) > 90


def test_centred_clipping_of_alike_rows_is_their_mean() -> None:
    x = torch.ones(6, 10)
    out = centred_clipping_select(gram_of(x), 1).apply(x)
    assert torch.allclose(out, torch.ones(10))


def test_centred_clipping_weighs_counts_and_caps_a_claimed_billion() -> None:
    # Two camps; the counts pull the aggregate towards the camp with the data ...
    a, b = torch.zeros(3, 4), torch.ones(3, 4)
    x = torch.cat([a, b])
    heavy = centred_clipping_select(gram_of(x), 1, torch.tensor([1.0, 1, 1, 3, 3, 3]))
    light = centred_clipping_select(gram_of(x), 1, torch.tensor([3.0, 3, 3, 1, 1, 1]))
    assert float(heavy.apply(x).mean()) > float(light.apply(x).mean())
    # ... but a row that claims a billion samples weighs at most COUNT_CAP median rows.
    x = torch.cat([_honest(7), 5 * torch.ones(1, 50)])
    counts = torch.tensor([100.0] * 7 + [1e9])
    capped = centred_clipping_select(gram_of(x), 1, counts)
    even = centred_clipping_select(gram_of(x), 1, torch.tensor([100.0] * 7 + [100 * COUNT_CAP]))
    assert capped.coefficients is not None and even.coefficients is not None
    assert torch.allclose(capped.coefficients, even.coefficients, atol=1e-6)


def test_centred_clipping_is_registered_and_needs_krums_minimum() -> None:
    assert "centred-clipping" in RULES
    assert rule_minimum("centred-clipping", 0.2) == rule_minimum("multi-krum", 0.2) == 5
    small = centred_clipping_select(gram_of(_honest(4)), 1)
    assert small.fallback is not None and small.fallback.startswith("median")


def test_a_cluster_smaller_than_the_rules_minimum_is_merged() -> None:
    g = torch.Generator().manual_seed(1)
    big = torch.randn(12, 20, generator=g)
    other = 8.0 + torch.randn(12, 20, generator=g)
    alone = -30.0 + torch.randn(1, 20, generator=g)
    x = torch.cat([big, other, alone])
    raw = cluster(x, k=3)
    assert sorted(np.bincount(raw.assignment).tolist()) == [1, 12, 12]
    fixed = defensible(raw, 5)
    assert fixed.k == 2 and sorted(np.bincount(fixed.assignment).tolist()) == [12, 13]
    # The outlier joins the cluster whose centre is nearest (big's, at 0, not other's at 8);
    # the two real clusters keep their members.
    assert fixed.assignment[-1] == fixed.assignment[0]
    assert len(set(fixed.assignment[:12].tolist())) == 1
    assert len(set(fixed.assignment[12:24].tolist())) == 1
    assert "absorbed" in fixed.k_from and fixed.centres is not None
    assert fixed.centres.shape == (2, 20)
    assert defensible(raw, 1) is raw  # the mean's minimum: nothing to absorb
    _, grouped = group_deltas(x, 3, min_size=MinCluster(5))
    assert grouped.k == 2
    # No split keeps clusters of 20: one cluster.
    assert defensible(raw, 20).k == 1


def test_nearest_neighbour_mixing_averages_each_rows_nearest() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    mix = nnm_mixing(gram_of(x), 2)  # each row: the mean of its 3 nearest, itself included
    assert torch.allclose(mix.sum(1), torch.ones(5))
    assert torch.allclose(mix @ x, torch.tensor([[1.0], [1.0], [1.0], [23 / 3], [23 / 3]]))
    sel = mixed_select(RULES["fedavg"], gram_of(x), 2, None)
    assert torch.allclose(sel.apply(x), (mix @ x).mean(0))
    median = mixed_select(RULES["median"], gram_of(x), 2, None)
    assert torch.allclose(median.apply(x), (mix @ x).median(0).values)


def test_defence_with_mixing_and_centred_clipping_runs_over_clusters() -> None:
    x = torch.cat([_honest(6, seed=1), _honest(6, seed=2) + 1])
    labels = [0] * 6 + [1] * 6
    for config in (
        DefenceConfig("centred-clipping", 0.2),
        DefenceConfig("multi-krum", mixing=True),
    ):
        out = defend(x, labels, config)
        assert out.survivors == [0, 1]
        assert torch.allclose(out.cluster_deltas[0], x[:6].mean(0), atol=0.1)
        assert torch.allclose(out.cluster_deltas[1], x[6:].mean(0), atol=0.1)


def _tipped_round() -> tuple[torch.Tensor, list[int]]:
    """Four honest clusters pulling the round's way, and a fifth (cluster 2, a fifth of the
    round) whose rows all point back."""
    g = torch.Generator().manual_seed(3)
    base = torch.ones(40)
    parts = [base + 0.1 * c + 0.3 * torch.randn(5, 40, generator=g) for c in range(4)]
    tipped = -base + 0.05 * torch.randn(5, 40, generator=g)  # as long as an honest one
    x = torch.cat([parts[0], parts[1], tipped, parts[2], parts[3]])
    return x, [c for c in range(5) for _ in range(5)]


def test_a_cluster_pointing_against_the_round_is_dropped() -> None:
    x, labels = _tipped_round()
    out = defend(x, labels, DefenceConfig("centred-clipping", 0.2, direction=True))
    assert out.survivors == [0, 1, 3, 4]
    assert "points against the round" in out.rejected_clusters[2]
    # Off, the cluster check by length alone lets it through.
    off = defend(x, labels, DefenceConfig("centred-clipping", 0.2, direction=False))
    assert off.survivors == [0, 1, 2, 3, 4]


def test_honest_clusters_that_differ_are_kept() -> None:
    g = torch.Generator().manual_seed(4)
    shared = torch.ones(40)
    own = torch.zeros(3, 40)
    for c in range(3):  # each cluster also pulls its own coordinates
        own[c, c * 10 : c * 10 + 10] = 3.0
    x = torch.cat([shared + own[c] + 0.3 * torch.randn(5, 40, generator=g) for c in range(3)])
    config = DefenceConfig("centred-clipping", 0.2, direction=True)
    out = defend(x, [c for c in range(3) for _ in range(5)], config)
    assert out.survivors == [0, 1, 2] and not out.rejected_clusters


def test_recentring_clips_the_farthest_cluster_to_the_median_distance() -> None:
    x, labels = _tipped_round()
    out = defend(x, labels, DefenceConfig("centred-clipping", 0.2, direction=False, recentre=True))
    assert out.survivors == [0, 1, 2, 3, 4]
    plain = defend(x, labels, DefenceConfig("centred-clipping", 0.2, direction=False))
    # The tipped cluster moved towards the round's centre: its delta is no longer minus
    # the honest direction at full length, and the honest clusters within tau are untouched.
    assert float(out.cluster_deltas[2].mean()) > float(plain.cluster_deltas[2].mean()) + 0.5
    assert torch.allclose(out.cluster_deltas[0], plain.cluster_deltas[0], atol=1e-5)


def test_centred_clipping_is_a_convex_combination() -> None:
    # What its central-DP sensitivity rests on (core/sensitivity.py): coefficients >= 0
    # summing to 1, whatever the rows and the declared counts.
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        x = torch.randn(9, 30, generator=g) * (1 + 10 * torch.rand(9, 1, generator=g))
        counts = 1 + 1000 * torch.rand(9, generator=g)
        sel = centred_clipping_select(gram_of(x), 1, counts if trial % 2 else None)
        assert sel.coefficients is not None
        assert float(sel.coefficients.min()) >= -1e-6
        assert abs(float(sel.coefficients.sum()) - 1.0) < 1e-5


def test_the_minimum_cluster_is_the_rules_but_at_most_half_an_even_share() -> None:
    assert MinCluster(5).of(30, 3) == 5  # Multi-Krum's minimum at 20%
    assert MinCluster(5).of(12, 3) == 2  # a small federation keeps clusters of 2
    assert MinCluster(5).of(6, 3) == 1  # ... and of 1: nothing is defended there anyway
    assert MinCluster(5, asked=1).of(30, 3) == 1  # --min-cluster 1: never absorbed
    assert MinCluster(5, asked=8).of(12, 3) == 8  # what is asked, whatever the share
    assert MinCluster(1).of(1000, 2) == 1  # the mean's minimum
