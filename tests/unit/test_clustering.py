"""Clustering recovers the ground-truth groups from sample-adjusted pre-training deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.clusterer.clustering import cluster, count_sketch, energy_k
from services.common.errors import ConfigError
from services.common.figures import purity
from services.common.models import build_model
from services.participant.datasets import load_dataset
from services.participant.partition import partition
from services.participant.training import pre_train_delta

DATA = load_dataset("digits")


def digits_deltas(n: int, adjusted: bool, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    shards = partition(
        DATA.y_train.numpy(), DATA.y_test.numpy(), "practical-noniid", n, seed, 10, groups=3
    )
    model = build_model("cnn", DATA.input_shape, 10, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.stack(
        [
            pre_train_delta(model, DATA.x_train[s.train], DATA.y_train[s.train], gen, adjusted)
            for s in shards
        ]
    )
    return deltas, np.array([s.group for s in shards])


@pytest.mark.parametrize("n,seed", [(15, 0), (30, 1)])
def test_hierarchical_recovers_practical_noniid_groups(n, seed):
    deltas, truth = digits_deltas(n, adjusted=True, seed=seed)
    res = cluster(deltas, k=3, method="hierarchical", seed=seed)
    adjusted = purity(res.assignment, truth)
    raw, truth_raw = digits_deltas(n, adjusted=False, seed=seed)
    unadjusted = purity(cluster(raw, k=3, seed=seed).assignment, truth_raw)
    print(f"\npurity n={n}: sample-adjusted {adjusted:.3f}, unadjusted {unadjusted:.3f}")
    assert adjusted >= 0.9
    assert res.k == 3 and res.k_from == "given" and res.score > 0


@pytest.mark.parametrize("method", ["kmeans", "dbscan"])
def test_other_methods_separate_clear_groups(method):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 50, generator=gen) * 10
    truth = np.repeat([0, 1, 2], 8)
    x = centers[truth] + 0.1 * torch.randn(24, 50, generator=gen)
    res = cluster(x, k=3 if method == "kmeans" else None, method=method)
    assert res.k == 3 and purity(res.assignment, truth) == 1.0


@pytest.mark.parametrize("auto", ["silhouette", "energy"])
def test_automatic_k(auto):
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 30, generator=gen) * 10
    truth = np.repeat([0, 1, 2, 3], 6)
    x = centers[truth] + 0.05 * torch.randn(24, 30, generator=gen)
    res = cluster(x, k=None, auto=auto)
    assert res.k_from == auto
    if auto == "silhouette":
        assert res.k == 4 and purity(res.assignment, truth) == 1.0
    else:
        assert 2 <= res.k <= 4


def test_energy_k_counts_directions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 2)) @ rng.normal(size=(2, 40))  # rank 2
    assert energy_k(x, 0.99) <= 2


def test_projection_keeps_distances_and_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 100_000, generator=gen)
    truth = np.repeat([0, 1, 2], 5)
    x = centers[truth] + 0.3 * torch.randn(15, 100_000, generator=gen)
    sketch = count_sketch(x, 2048, seed=0)
    d_full = torch.cdist(x, x)
    d_proj = torch.cdist(sketch, sketch)
    mask = ~torch.eye(15, dtype=torch.bool)
    rel = ((d_proj[mask] - d_full[mask]).abs() / d_full[mask]).max()
    assert float(rel) < 0.15
    res = cluster(x, k=3)
    assert res.projected_dim == 2048 and purity(res.assignment, truth) == 1.0


def test_bad_input():
    with pytest.raises(ConfigError):
        cluster(torch.zeros(5, 3), k=6)
    with pytest.raises(ConfigError):
        cluster(torch.full((5, 3), float("nan")), k=2)
    with pytest.raises(ConfigError):
        cluster(torch.zeros(5, 3), method="spectral")


def test_screen_refuses_non_finite_and_absurd_deltas_only():
    from services.clusterer.clustering import screen_deltas

    x = torch.randn(6, 50)
    x[1] = 3e38  # finite in float32, but its length overflows float32
    x[3, 0] = float("nan")
    x[4] *= 100
    assert screen_deltas(x).tolist() == [True, False, True, False, False, True]
    assert screen_deltas(torch.randn(2, 5)).all()  # too few to judge lengths: finite is enough
