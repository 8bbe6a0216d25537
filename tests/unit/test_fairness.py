"""Fairness where one model underserves a group: per-group figures, per-cluster models."""

from __future__ import annotations

import json

import pytest
import torch

from services.cli import main
from services.common.settings import DefenceSettings
from services.core.errors import ConfigError
from services.core.rounds import aggregate_round
from services.core.strategies import get_strategy
from services.experiment import ExperimentConfig
from services.local import run_local

# min_cluster 1: the pair is served as a cluster of its own, undefended (the default would
# have it absorbed by the nearest cluster: it is smaller than Multi-Krum's minimum).
MINORITY = dict(partition="rotated-groups", group_sizes=(20, 8, 2), min_cluster=1)


def test_personalised_round_moves_each_cluster_model_by_its_own_delta():
    # Two clusters trained from their own models: cluster c's next model is its model plus
    # its robust delta (fedavg inside the cluster), the global the merge's sum of them.
    torch.manual_seed(0)
    d = 6
    bases = {0: torch.randn(d), 1: torch.randn(d)}
    deltas = torch.randn(4, d)
    clusters = [0, 0, 1, 1]
    acc = {0: 0.9, 1: 0.4}
    out = aggregate_round(
        torch.zeros(d),
        deltas,
        clusters,
        [10, 10, 10, 10],
        get_strategy("flclustering-fedavg"),
        3,
        acc,
        DefenceSettings(),
        cluster_bases=bases,
    )
    want0 = bases[0] + deltas[:2].mean(0)
    want1 = bases[1] + deltas[2:].mean(0)
    torch.testing.assert_close(out.cluster_models[0], want0)
    torch.testing.assert_close(out.cluster_models[1], want1)
    p = out.cluster_weights
    assert p[1] > p[0]  # the worse-served cluster weighs more
    torch.testing.assert_close(out.global_weights, p[0] * want0 + p[1] * want1)
    # Without personalisation the same rows are deltas against the global model.
    plain = aggregate_round(
        torch.zeros(d),
        deltas,
        clusters,
        [10] * 4,
        get_strategy("flclustering-fedavg"),
        3,
        acc,
        DefenceSettings(),
    )
    assert plain.cluster_models == {}
    torch.testing.assert_close(
        plain.global_weights, p[0] * deltas[:2].mean(0) + p[1] * deltas[2:].mean(0)
    )


def test_personalise_needs_a_clustered_strategy():
    with pytest.raises(ConfigError, match="--personalise needs a clustered strategy"):
        ExperimentConfig().replace(strategy="fedavg", personalise=True)


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_per_cluster_models_serve_the_minority_where_one_model_does_not():
    # Rotated digits, groups of 20, 8 and 2 participants turned 0, 90 and 180 degrees: one
    # global model serves the rotated minority badly; each cluster's own model serves it.
    common = dict(rounds=12, seed=1, **MINORITY)
    fedavg = run_local(ExperimentConfig().replace(strategy="fedavg", **common))
    mine = run_local(
        ExperimentConfig().replace(strategy="flclustering", personalise=True, **common)
    )
    assert mine.clustering["purity"] == 1.0
    assert set(fedavg.final["group_accuracy"]) == {0, 1, 2}
    worst = fedavg.final["worst_group_accuracy"]
    assert mine.final["personal_worst_group_accuracy"] >= worst + 0.10
    assert mine.final["personal_mean_accuracy"] >= fedavg.final["mean_accuracy"]
    # Every round reports both: the global model's figures and the cluster models'.
    last = mine.rounds[-1]
    assert set(last["personal_group_accuracy"]) == {0, 1, 2}
    assert last["personal_mean_accuracy"] == mine.final["personal_mean_accuracy"]


@pytest.mark.parametrize("strategy", ["fedavg", "qffl", "flclustering"])
def test_local_writes_worst_group_accuracy_on_the_minority_scenario(strategy, tmp_path, capsys):
    out = tmp_path / strategy
    argv = [
        "local",
        "--partition",
        "rotated-groups",
        "--group-sizes",
        "20,8,2",
        "--min-cluster",
        "1",
    ]
    argv += ["--strategy", strategy, "--rounds", "2", "--out", str(out)]
    assert main(argv) == 0
    final = json.loads((out / "results.json").read_text())["final"]
    groups = final["group_accuracy"]
    assert set(groups) == {"0", "1", "2"}
    assert final["worst_group_accuracy"] == min(groups.values())
    assert f"worst group {final['worst_group_accuracy']:.3f}" in capsys.readouterr().out
