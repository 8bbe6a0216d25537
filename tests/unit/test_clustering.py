"""Clustering recovers the ground-truth groups from sample-adjusted pre-training deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.figures import purity
from services.core.clustering import cluster, count_sketch, energy_k
from services.core.errors import ConfigError
from services.core.models import build_model
from services.participant.datasets import load_dataset
from services.participant.examples import TensorExamples
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
            pre_train_delta(
                model, TensorExamples(DATA.x_train[s.train], DATA.y_train[s.train]), gen, adjusted
            )
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
    from services.core.clustering import screen_deltas

    x = torch.randn(6, 50)
    x[1] = 3e38  # finite in float32, but its length overflows float32
    x[3, 0] = float("nan")
    x[4] *= 100
    assert screen_deltas(x).tolist() == [True, False, True, False, False, True]
    assert screen_deltas(torch.randn(2, 5)).all()  # too few to judge lengths: finite is enough


# ---- scale: exact up to FIT_SAMPLE rows, sampled fit plus nearest-centre assignment above ----


def separated(n: int, d: int, seed: int, k: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """k well-separated Gaussian groups of unequal sizes, float32."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen) * 5
    truth = torch.multinomial(torch.tensor([0.5, 0.3, 0.2][:k]), n, True, generator=gen)
    return centres[truth] + torch.randn(n, d, generator=gen), truth.numpy()


@pytest.mark.parametrize("method", ["hierarchical", "kmeans"])
def test_small_n_is_the_exact_fit(method):
    from sklearn.cluster import AgglomerativeClustering, KMeans

    x, _ = separated(80, 12, seed=3)
    exact = (
        AgglomerativeClustering(n_clusters=4, linkage="ward")
        if method == "hierarchical"
        else KMeans(n_clusters=4, n_init=10, random_state=5)
    ).fit_predict(x.double().numpy())
    res = cluster(x, k=4, method=method, seed=5, fit_sample=80)
    assert res.sampled is None and np.array_equal(res.assignment, exact)
    assert res.centres is not None and res.centres.shape == (4, 12)
    members = x.double().numpy()[res.assignment == 2]
    np.testing.assert_allclose(res.centres[2], members.mean(axis=0))
    assert cluster(x, k=4, method=method, seed=5, fit_sample=79).sampled == 79


@pytest.mark.parametrize("method", ["hierarchical", "kmeans", "dbscan"])
def test_large_n_fits_a_sample_and_recovers_the_groups(method):
    from services.core.clustering import FIT_SAMPLE

    x, truth = separated(FIT_SAMPLE + 700, 16, seed=0)
    # DBSCAN finds its own k; min_samples=2 over-splits in 16 dimensions, sampled or not.
    kw = {"k": None, "dbscan_min_samples": 5} if method == "dbscan" else {"k": 3}
    res = cluster(x, method=method, seed=1, **kw)
    assert res.sampled == FIT_SAMPLE and res.assignment.shape == (len(x),)
    assert res.k == 3 and purity(res.assignment, truth) == 1.0 and res.score > 0.5
    again = cluster(x, method=method, seed=1, **kw)
    assert np.array_equal(res.assignment, again.assignment)  # the sample is seeded
    assert res.centres is not None
    for c in range(3):  # centres are the means of every member, not only the sample's
        np.testing.assert_allclose(
            res.centres[c], x.double().numpy()[res.assignment == c].mean(0), atol=1e-9
        )


def test_large_n_chooses_k_on_the_sample():
    x, truth = separated(900, 10, seed=2)
    for auto in ("silhouette", "energy"):
        res = cluster(x, k=None, auto=auto, fit_sample=300, seed=4)
        assert res.sampled == 300 and res.k_from == auto
        if auto == "silhouette":
            assert res.k == 3 and purity(res.assignment, truth) == 1.0
    other = cluster(x, k=3, fit_sample=300, seed=5)  # another sample, the same groups
    assert purity(other.assignment, truth) == 1.0


def test_large_n_needs_a_sample_that_holds_k():
    with pytest.raises(ConfigError, match="fit_sample"):
        cluster(torch.randn(50, 4), k=30, fit_sample=20)


def test_kth_neighbour_distance_equals_the_naive_tensor():
    from services.core.clustering import kth_neighbour_distance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 20))
    x[7] = x[3]  # a duplicate: its nearest other row is at distance 0
    naive = np.sort(np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)), axis=1)
    for m in (1, 2, 5, 149, 500):
        assert np.array_equal(kth_neighbour_distance(x, m), naive[:, min(m, 149)])


def test_dbscan_eps_needs_no_n_by_n_by_d_memory():
    import tracemalloc

    x, truth = separated(1500, 64, seed=1)  # the n x n x d tensor would take 1.15 GB
    tracemalloc.start()
    try:
        res = cluster(x, k=None, method="dbscan", fit_sample=1500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.sampled is None and purity(res.assignment, truth) == 1.0
    assert peak < 300e6


def test_screen_works_by_blocks_and_still_refuses_bad_rows():
    from services.core.clustering import screen_deltas

    x = torch.randn(3000, 2048)  # two blocks of rows
    bad = {2500: 3e38, 2999: float("nan"), 10: float("inf")}
    for row, value in bad.items():
        x[row, 5] = value
    x[2600] *= 50
    ok = screen_deltas(x)
    assert sorted(np.flatnonzero(~ok.numpy()).tolist()) == [10, 2500, 2600, 2999]


def test_sketch_of_a_row_does_not_depend_on_its_batch():
    chunk = 1 << 17
    x = torch.randn(64, 2 * chunk + 5, generator=torch.Generator().manual_seed(0))
    batch = count_sketch(x, 256, seed=3, chunk=chunk)  # several blocks of rows per chunk
    alone = torch.cat([count_sketch(x[i : i + 1], 256, seed=3, chunk=chunk) for i in (0, 63)])
    assert torch.equal(batch[[0, 63]], alone)


def test_group_deltas_refuses_bad_rows_on_the_sampled_path():
    from services.core.clustering import group_deltas

    x, truth = separated(700, 8, seed=6)
    x[4, 0] = float("nan")
    x[9] *= 1e3
    fit, res = group_deltas(x, 3, fit_sample=200, seed=2)
    assert (~fit).nonzero().flatten().tolist() == [4, 9]
    assert res.sampled == 200 and purity(res.assignment, truth[fit.numpy()]) == 1.0


def test_ward_cut_is_scipys_cut_tree():
    from scipy.cluster.hierarchy import cut_tree, linkage

    from services.core.clustering import ward_cut

    x = np.random.default_rng(0).normal(size=(120, 5))
    x[10] = x[11] = x[12]  # merges at height 0
    tree = linkage(x, "ward")
    for k in (1, 2, 3, 7, 119, 120):
        ours, scipys = ward_cut(tree, k), cut_tree(tree, n_clusters=k)[:, 0]
        assert len(np.unique(ours)) == k
        assert purity(ours, scipys) == 1.0 and purity(scipys, ours) == 1.0


def test_ward_and_silhouette_are_scikit_learns_without_importing_it():
    """The exact path numbers Ward's clusters as AgglomerativeClustering does and scores
    them as silhouette_score does, so runs match the ones made with scikit-learn."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    from services.core.clustering import _distances, silhouette

    rng = np.random.default_rng(7)
    for n, d, groups in [(30, 50, 3), (200, 20, 5), (57, 300, 4), (5, 3, 2)]:
        centres = rng.normal(0, 3, (groups, d))
        x = centres[rng.integers(0, groups, n)] + rng.normal(0, 1, (n, d))
        for k in range(1, min(n, 7)):
            got = cluster(torch.from_numpy(x), k=k)
            want = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
            assert got.assignment.tolist() == want.tolist(), (n, k)
            if 2 <= k < n:
                assert got.score == pytest.approx(silhouette_score(x, want), abs=1e-9)
        singletons = np.array([0, 0, 1, 2, 2])
        ref = silhouette_score(x[:5], singletons)
        assert silhouette(_distances(x[:5]), singletons) == pytest.approx(ref, abs=1e-9)
    code = (
        "import sys, torch; from services.core.clustering import cluster; "
        "cluster(torch.randn(40, 10), k=None); print('sklearn' in sys.modules)"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
