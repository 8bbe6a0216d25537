"""The round's defence holds when a cluster is mostly attackers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.core.defence import DefenceConfig, defend
from services.core.errors import ConfigError


def honest(n, d=200, seed=0, center=None):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(d, generator=gen) * 0.1 if center is None else center
    return c + 0.01 * torch.randn(n, d, generator=gen)


def test_norm_screen_catches_a_cluster_of_mostly_attackers(device):
    gen = torch.Generator().manual_seed(1)
    global_w = torch.randn(200, generator=gen).to(device)
    deltas = torch.cat([honest(5, seed=2), honest(5, seed=3), honest(5, seed=4)]).to(device)
    attackers = [0, 1, 2, 5]  # cluster 0 has 3 of 5 attackers
    for i in attackers:
        deltas[i] = -(global_w + deltas[i]) - global_w  # sends the negated model
    clusters = [0] * 5 + [1] * 5 + [2] * 5
    out = defend(deltas, clusters, DefenceConfig("multi-krum", 0.2))
    assert set(out.rejected_updates) >= set(attackers)
    assert all(out.rejected_updates[i] == "norm" for i in attackers)
    assert set(out.cluster_deltas) == {0, 1, 2}
    assert out.cluster_results[0].kept == (3, 4)
    assert all(d.device == deltas.device for d in out.cluster_deltas.values())
    # Without the screen, cluster 0's model is an attacker's and the cluster check drops it.
    unscreened = defend(deltas, clusters, DefenceConfig("krum", 0.2, norm_factor=None))
    assert 0 in unscreened.rejected_clusters and 0 not in unscreened.cluster_deltas


def test_norm_screen_measures_lengths_per_declared_sample(device):
    """A delta is the sum of its local steps: a participant with four times the median data
    sends a delta about four times as long, honestly, and is kept; without the counts the
    screen rejects it. A claimed count buys at most COUNT_CAP times the median length: a
    delta seven times the median is rejected however many samples its sender claims."""
    gen = torch.Generator().manual_seed(3)
    deltas = torch.randn(9, 200, generator=gen)
    deltas /= deltas.norm(dim=1, keepdim=True)  # every row length 1
    deltas[0] *= 4.0  # the largest shard: four times the median count
    deltas[1] *= 7.0  # claims a billion samples
    samples = [400, 10**9] + [100] * 7
    config = DefenceConfig("fedavg", 0.2, twin_factor=None, cluster_factor=None)
    counted = defend(deltas.to(device), [0] * 9, config, samples)
    assert counted.rejected_updates == {1: "norm"}
    plain = defend(deltas.to(device), [0] * 9, config)
    assert plain.rejected_updates == {0: "norm", 1: "norm"}


def test_fallback_is_reported_and_rows_map_back(device):
    deltas = honest(8).to(device)
    out = defend(deltas, [0] * 4 + [1] * 4, DefenceConfig("krum", 0.3))
    assert out.fallbacks == {0: "median: n=4 <= 2f+2=6", 1: "median: n=4 <= 2f+2=6"}
    assert out.cluster_results[1].kept == (4, 5, 6, 7)


def test_non_finite_updates_are_rejected(device):
    deltas = honest(6).to(device)
    deltas[2, 3] = float("nan")
    out = defend(deltas, [0] * 6, DefenceConfig("fedavg", 0.0), samples=[1, 2, 3, 4, 5, 6])
    assert out.rejected_updates == {2: "non-finite"}
    assert torch.isfinite(out.cluster_deltas[0]).all()


def test_bad_config():
    with pytest.raises(ConfigError):
        DefenceConfig("bogus")
    with pytest.raises(ConfigError):
        DefenceConfig(norm_factor=0.5)


@pytest.mark.parametrize("rule", ["krum", "multi-krum", "median", "trimmed-mean", "fedavg"])
def test_every_rule_defends_on_the_device_of_the_deltas(device, rule):
    """The same screening and aggregates wherever the deltas live (norm screen, rule, cluster
    check): a GPU aggregator must decide what a CPU one decides."""
    deltas = torch.cat([honest(7, seed=5), honest(7, seed=6)])
    deltas[1] *= 50  # screened out by norm
    clusters = [0] * 7 + [1] * 7
    samples = list(range(1, 15))
    want = defend(deltas, clusters, DefenceConfig(rule, 0.2), samples)
    got = defend(deltas.to(device), clusters, DefenceConfig(rule, 0.2), samples)
    assert got.rejected_updates == want.rejected_updates and 1 in got.rejected_updates
    assert got.rejected_clusters == want.rejected_clusters
    for c, d in want.cluster_deltas.items():
        assert got.cluster_deltas[c].device.type == device.type
        torch.testing.assert_close(got.cluster_deltas[c].cpu(), d, rtol=1e-5, atol=1e-6)


def test_of_two_clusters_the_check_keeps_a_longer_honest_one(device):
    """Of two cluster deltas the lower median is the shorter: the length rule alone would
    drop the longer, honest or not (it froze LEAF's synthetic federation at chance). An
    honest cluster whose members pull different ways has a delta shorter than its updates,
    so it stays however much longer than the other cluster's it is. With a third cluster
    the median says which one is off."""
    gen = torch.Generator().manual_seed(5)
    short = 0.1 * torch.randn(5, 200, generator=gen)
    long = 3.0 * torch.randn(9, 200, generator=gen)  # its cluster delta ~20x the short one's
    # Only the cluster check: the round-wide screens would take the long rows first.
    config = DefenceConfig(norm_factor=None, twin_factor=None)
    two = defend(torch.cat([short, long]).to(device), [0] * 5 + [1] * 9, config)
    assert not two.rejected_clusters and set(two.cluster_deltas) == {0, 1}
    third = 0.1 * torch.randn(5, 200, generator=gen)
    rows = torch.cat([short, long, third]).to(device)
    three = defend(rows, [0] * 5 + [1] * 9 + [2] * 5, config)
    assert set(three.rejected_clusters) == {1}
    assert "the median length" in three.rejected_clusters[1]


def test_of_two_clusters_the_check_shortens_one_colluders_won(device):
    """Colluders who are most of one of two clusters and send jittered copies of one crafted
    delta (jittered ALIE: each copy an ordinary length, past the norm and near-twin
    screens) give a cluster delta as long as their copies: over 3x the honest cluster's and
    longer than the round's median update, so it is shortened to that median length (the
    most an attacker who knows the bound would send anyway); the honest cluster's stays."""
    gen = torch.Generator().manual_seed(7)
    honest_rows = torch.randn(5, 200, generator=gen)  # length ~14, their mean ~6
    crafted = 2.0 * torch.randn(200, generator=gen)  # an ordinary length: ~28
    copies = crafted + 0.1 * torch.randn(4, 200, generator=gen)
    tipped = torch.cat([copies, torch.randn(1, 200, generator=gen)])  # 4 of its 5 rows
    rows = torch.cat([honest_rows, tipped]).to(device)
    config = DefenceConfig("fedavg", 0.2, twin_factor=None)
    out = defend(rows, [0] * 5 + [1] * 5, config)
    assert not out.rejected_clusters and set(out.shortened_clusters) == {1}
    assert "the round's median update length" in out.shortened_reasons[1]
    median_update = float(rows.norm(dim=1).median())
    full = tipped.to(device).mean(0)
    shortened = out.cluster_deltas[1]
    assert float(shortened.norm()) == pytest.approx(median_update, rel=1e-4)
    assert out.shortened_clusters[1].scale == pytest.approx(median_update / float(full.norm()))
    torch.testing.assert_close(shortened, full * out.shortened_clusters[1].scale)
    torch.testing.assert_close(out.cluster_deltas[0], honest_rows.to(device).mean(0))
    # a coordinate-wise rule's cluster delta is shortened the same way
    median_rule = defend(rows, [0] * 5 + [1] * 5, replace(config, rule="median"))
    assert set(median_rule.shortened_clusters) == {1}
    assert float(median_rule.cluster_deltas[1].norm()) == pytest.approx(median_update, rel=1e-4)


def test_a_shortened_cluster_moves_the_merged_model_only_that_far(device):
    """What the merge adds for a shortened cluster is its shortened delta: the next model
    moves by at most the round's median update in that cluster's direction."""
    from services.common.settings import DefenceSettings
    from services.core.rounds import aggregate_round
    from services.core.strategies import get_strategy

    gen = torch.Generator().manual_seed(7)
    honest_rows = torch.randn(5, 200, generator=gen)
    crafted = 2.0 * torch.randn(200, generator=gen)
    tipped = torch.cat([crafted + 0.1 * torch.randn(5, 200, generator=gen)])
    rows = torch.cat([honest_rows, tipped]).to(device)
    base = torch.zeros(200, device=device)
    settings = DefenceSettings(twin_factor=0.001)
    got = aggregate_round(
        base, rows, [0] * 5 + [1] * 5, [10] * 10, get_strategy("flclustering"), 0, {}, settings
    )
    assert set(got.defence.shortened_clusters) == {1} and not got.defence.rejected_clusters
    median_update = float(rows.norm(dim=1).median())
    deltas = {c: got.defence.cluster_results[c].apply(rows) for c in (0, 1)}
    assert float(deltas[1].norm()) == pytest.approx(median_update, rel=1e-4)
    assert float(deltas[1].norm()) < 0.5 * float(tipped.mean(0).norm())  # it was longer
    assert got.cluster_weights == {0: 0.5, 1: 0.5}
    want = base + 0.5 * deltas[0] + 0.5 * deltas[1]
    torch.testing.assert_close(got.global_weights, want, rtol=1e-5, atol=1e-5)


def test_central_privacy_keeps_the_shortening_of_a_cluster():
    """Under central DP every cluster's rule becomes a clipped sum over its expected count
    (`fixed_means`); a cluster the check shortened stays that much shorter."""
    from services.core.rounds import fixed_means

    gen = torch.Generator().manual_seed(7)
    honest_rows = torch.randn(5, 200, generator=gen)
    tipped = 2.0 * torch.randn(200, generator=gen) + 0.1 * torch.randn(5, 200, generator=gen)
    out = defend(torch.cat([honest_rows, tipped]), [0] * 5 + [1] * 5, DefenceConfig("fedavg"))
    scale = out.shortened_clusters[1].scale
    assert 0 < scale < 1
    fixed_means(out, {0: 4.0, 1: 4.0})
    torch.testing.assert_close(
        out.cluster_results[1].selection.coefficients, torch.full((5,), scale / 4.0)
    )
    kept = out.cluster_results[0].selection.coefficients
    torch.testing.assert_close(kept, torch.full((5,), 0.25))
