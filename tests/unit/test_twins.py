"""Near-twin screens: the pure function against a naive reference, and where it is used
(the round's defence, the clustering of pre-training deltas, the in-process federation)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from services.core.clustering import group_deltas, twin_deltas
from services.core.defence import DefenceConfig, defend
from services.core.plan import group_accuracy
from services.core.twins import twins
from services.experiment import ExperimentConfig
from services.local import run_local


def naive_twins(x: np.ndarray, factor: float) -> list[bool]:
    n = len(x)
    if n < 3:
        return [False] * n
    d = [[math.dist(x[i], x[j]) for j in range(n)] for i in range(n)]
    pairs = sorted(d[i][j] for i in range(n) for j in range(n) if i != j)
    med = pairs[len(pairs) // 2]  # the upper median
    if med == 0:
        return [False] * n
    return [min(d[i][j] for j in range(n) if j != i) <= factor * med for i in range(n)]


@st.composite
def rows_with_copies(draw):
    n = draw(st.integers(1, 9))
    d = draw(st.integers(1, 6))
    ints = st.integers(-20, 20)  # integers: distances are exact in float64 either way
    x = np.array(draw(st.lists(st.lists(ints, min_size=d, max_size=d), min_size=n, max_size=n)))
    copies = draw(st.lists(st.integers(0, n - 1), max_size=3))
    return np.concatenate([x, x[copies]]).astype(np.float64)


@settings(max_examples=200, deadline=None)
@given(rows_with_copies(), st.sampled_from([0.03, 0.1, 0.5]))
def test_twins_is_the_naive_nearest_neighbour_rule(x, factor):
    t = torch.from_numpy(x)
    got = twins(t @ t.T, factor).tolist()
    assert got == naive_twins(x, factor)
    assert twin_deltas(t.float(), factor).tolist() == got


def honest(n, d=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=gen) * 0.1 + 0.02 * torch.randn(n, d, generator=gen)


def test_the_defence_rejects_colluders_who_send_one_delta(device):
    deltas = torch.cat([honest(5, seed=1), honest(5, seed=2), honest(5, seed=3)])
    crafted = -0.1 * deltas.mean(0)  # IPM: small, close to the others, and identical
    colluders = [0, 1, 5, 6, 10]
    deltas[colluders] = crafted
    deltas = deltas.to(device)
    clusters = [0] * 5 + [1] * 5 + [2] * 5
    out = defend(deltas, clusters, DefenceConfig("multi-krum", 0.2))
    assert {i: r for i, r in out.rejected_updates.items() if r == "near-twin"} == {
        i: "near-twin" for i in colluders
    }
    assert (
        not set(out.rejected_updates)
        - set(colluders)
        - {i for i, r in out.rejected_updates.items() if r == "multi-krum"}
    )
    # Switched off (the undefended strategies): Multi-Krum keeps a crafted delta.
    off = defend(deltas, clusters, DefenceConfig("multi-krum", 0.2, twin_factor=None))
    assert "near-twin" not in off.rejected_updates.values()
    assert {0, 1} & set(off.cluster_results[0].kept)


def test_honest_deltas_are_never_twins():
    deltas = torch.cat([honest(10, seed=s) for s in range(3)])
    out = defend(deltas, [0] * 10 + [1] * 10 + [2] * 10, DefenceConfig("multi-krum", 0.2))
    assert "near-twin" not in out.rejected_updates.values()


def test_clustering_leaves_out_steered_pre_training_deltas():
    deltas = torch.cat([honest(6, seed=s) for s in range(3)])
    deltas[[0, 7, 14]] = deltas[[0, 7, 14]].mean(0)  # three colluders, one delta
    fit, res = group_deltas(deltas, 3)
    assert (~fit).nonzero().flatten().tolist() == [0, 7, 14]
    assert len(res.assignment) == 15
    fit, _ = group_deltas(deltas, 3, twin_factor=None)
    assert bool(fit.all())


def test_the_median_of_reported_accuracies_ignores_a_minority_of_liars():
    accs = {"a": 0.95, "b": 0.94, "c": 0.0, "d": 0.96, "e": 0.93, "f": 0.5}
    groups = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "f": 1}
    got = group_accuracy(accs, groups, {"a": 0, "f": 1})
    assert got == {0: 0.94, 1: 0.5}


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_in_process_colluders_are_screened_out():
    """30% IPM attackers (identical deltas) and cluster steering: every crafted update is
    rejected, and the steered pre-training deltas leave their senders out of every cluster."""
    torch.set_num_threads(2)
    ipm = run_local(ExperimentConfig().replace(rounds=4, attack="ipm", attack_rate=0.3))
    selected = sum(r["attackers_selected"] for r in ipm.rounds)
    assert selected > 0 and sum(r["rejected_attackers"] for r in ipm.rounds) == selected
    steer = run_local(
        ExperimentConfig().replace(rounds=2, attack="cluster-steering", attack_rate=0.3)
    )
    attackers = [c for c in steer.clusters if c["attacker"]]
    assert len(attackers) == 9 and all(c["cluster"] == -1 for c in attackers)
    assert all(c["cluster"] >= 0 for c in steer.clusters if not c["attacker"])
    assert sum(r["attackers_selected"] for r in steer.rounds) == 0
