"""The round's defence holds when a cluster is mostly attackers."""

from __future__ import annotations

import pytest
import torch

from services.aggregator.defence import DefenceConfig, defend
from services.common.errors import ConfigError


def honest(n, d=200, seed=0, center=None):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(d, generator=gen) * 0.1 if center is None else center
    return c + 0.01 * torch.randn(n, d, generator=gen)


def test_norm_screen_catches_a_cluster_of_mostly_attackers():
    gen = torch.Generator().manual_seed(1)
    global_w = torch.randn(200, generator=gen)
    deltas = torch.cat([honest(5, seed=2), honest(5, seed=3), honest(5, seed=4)])
    attackers = [0, 1, 2, 5]  # cluster 0 has 3 of 5 attackers
    for i in attackers:
        deltas[i] = -(global_w + deltas[i]) - global_w  # sends the negated model
    clusters = [0] * 5 + [1] * 5 + [2] * 5
    out = defend(deltas, clusters, DefenceConfig("multi-krum", 0.2))
    assert set(out.rejected_updates) >= set(attackers)
    assert all(out.rejected_updates[i] == "norm" for i in attackers)
    assert set(out.cluster_deltas) == {0, 1, 2}
    assert out.cluster_results[0].kept == (3, 4)
    # Without the screen, cluster 0's model is an attacker's and the cluster check drops it.
    unscreened = defend(deltas, clusters, DefenceConfig("krum", 0.2, norm_factor=None))
    assert 0 in unscreened.rejected_clusters and 0 not in unscreened.cluster_deltas


def test_fallback_is_reported_and_rows_map_back():
    deltas = honest(8)
    out = defend(deltas, [0] * 4 + [1] * 4, DefenceConfig("krum", 0.3))
    assert out.fallbacks == {0: "median: n=4 <= 2f+2=6", 1: "median: n=4 <= 2f+2=6"}
    assert out.cluster_results[1].kept == (4, 5, 6, 7)


def test_non_finite_updates_are_rejected():
    deltas = honest(6)
    deltas[2, 3] = float("nan")
    out = defend(deltas, [0] * 6, DefenceConfig("fedavg", 0.0))
    assert out.rejected_updates == {2: "non-finite"}
    assert torch.isfinite(out.cluster_deltas[0]).all()


def test_bad_config():
    with pytest.raises(ConfigError):
        DefenceConfig("bogus")
    with pytest.raises(ConfigError):
        DefenceConfig(norm_factor=0.5)
